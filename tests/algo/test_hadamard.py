import numpy as np
import pytest
import scipy.linalg
import torch

from dreidel.algo import hadamard_factor, hadamard_matrix, is_hadamard_length, nearest_hadamard_lengths
from dreidel.algo._hadamard import small_hadamard


@pytest.mark.parametrize("m", [12, 20, 28])
def test_paley_factor_is_symmetric_hadamard(m):
    h = small_hadamard(m)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h, h.T)
    assert torch.equal(h @ h, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("k", range(0, 9))
def test_powers_of_two_match_scipy(k):
    n = 1 << k
    np.testing.assert_array_equal(hadamard_matrix(n).numpy(), scipy.linalg.hadamard(n))


@pytest.mark.parametrize("n", [12, 24, 384, 20, 80, 28, 112])
def test_composite_lengths_are_kronecker_products(n):
    m, chunk = hadamard_factor(n)
    h = hadamard_matrix(n)
    expected = np.kron(small_hadamard(m).numpy(), scipy.linalg.hadamard(chunk))
    np.testing.assert_array_equal(h.numpy(), expected)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize(
    "n, factor",
    [(1, (1, 1)), (2, (1, 2)), (1024, (1, 1024)), (12, (12, 1)), (384, (12, 32)), (1536, (12, 128)),
     (40, (20, 2)), (56, (28, 2)), (1 << 30, (1, 1 << 30))],
)
def test_supported_lengths(n, factor):
    assert hadamard_factor(n) == factor
    assert is_hadamard_length(n)


@pytest.mark.parametrize("n", [0, -4, 3, 6, 36, 100, 1000, (1 << 30) + 1, 2.0])
def test_unsupported_lengths(n):
    assert hadamard_factor(n) is None
    assert not is_hadamard_length(n)


def test_nearest_lengths():
    assert nearest_hadamard_lengths(100) == (96, 112)
    assert nearest_hadamard_lengths(1000) == (896, 1024)  # 896 = 28 * 32
    assert nearest_hadamard_lengths(384) == (384, 384)
    assert nearest_hadamard_lengths(0) == (None, 1)
    import numpy as np
    assert nearest_hadamard_lengths(np.int64(100)) == nearest_hadamard_lengths(torch.tensor(100)) == (96, 112)


@pytest.mark.parametrize("bad", [10.5, "10", True, torch.tensor(10.0)])
def test_nearest_lengths_refuse_what_is_not_an_integer(bad):
    """10.5 gave (8, 12) and "10" a TypeError from comparing an int with a str (a user audit)."""
    with pytest.raises(TypeError, match="n must be an int"):
        nearest_hadamard_lengths(bad)


def test_hadamard_matrix_rejects_bad_length():
    with pytest.raises(ValueError, match="n=100"):
        hadamard_matrix(100)
    for bad in (True, 4.0, "4", torch.tensor(4.0), torch.tensor(True)):
        with pytest.raises(TypeError, match="n must be an int"):
            hadamard_matrix(bad)
        assert not is_hadamard_length(bad)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):  # was torch's "Invalid device string"
        hadamard_matrix(4, "float32")


@pytest.mark.parametrize("n", [np.int64(12), np.int32(4), torch.tensor(40)])
def test_any_integer_type_is_a_length(n):
    assert is_hadamard_length(n)
    assert torch.equal(hadamard_matrix(n), hadamard_matrix(int(n)))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool])
def test_dtypes_that_cannot_hold_minus_one_are_refused(dtype):
    """uint8 gave [[1, 1], [1, 255]] and bool all True (a user audit); signed integers keep their -1."""
    with pytest.raises(TypeError, match=f"dtype must hold -1 .*got {dtype}"):
        hadamard_matrix(2, dtype)
    assert hadamard_matrix(2, torch.int8).tolist() == [[1, 1], [1, -1]]
