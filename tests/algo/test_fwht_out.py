"""dreidel.fwht(x, out=...): the transform written into a given tensor, as torch's out= arguments are."""

import pytest
import torch

import dreidel as dr

CASES = [((6, 64), -1), ((64, 6, 16), 0), ((8, 12, 32), (0, -1)), ((3, 20, 5), 1), ((4, 1 << 15), -1)]


@pytest.mark.parametrize(("shape", "dim"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_out_holds_the_transform_and_x_is_untouched(shape, dim, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype)
    before = x.clone()
    out = torch.full_like(x, float("nan"))
    address, version = out.data_ptr(), out._version
    result = dr.fwht(x, dim=dim, out=out)
    assert result is out and out.data_ptr() == address and out._version > version
    assert torch.equal(x, before)
    # against the reference in float64 and against the out-of-place call
    truth = dr.fwht_reference(x.double(), dim=dim).to(dtype)
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(out, truth, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(out, dr.fwht(x, dim=dim), rtol=tolerance, atol=tolerance)


def test_out_with_other_strides_than_x_and_out_x_itself():
    x = torch.randn(16, 32, 8)
    expected = dr.fwht(x, dim=1, normalized=False)
    out = torch.empty(8, 32, 16).permute(2, 1, 0)  # x's shape, transposed memory
    dr.fwht(x, dim=1, normalized=False, out=out)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    y = x.clone()
    assert dr.fwht(y, dim=1, normalized=False, out=y) is y  # out=x: the in-place transform
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    rows = torch.randn(2, 1024)  # disjoint views of one storage
    first = rows[0].clone()
    dr.fwht(rows[0], out=rows[1])
    torch.testing.assert_close(rows[1], dr.fwht(first))


def test_out_in_the_same_storage_as_x_but_on_other_elements():
    # the byte ranges meet, the elements do not: computed apart first, then written (torch.add takes these too)
    for x_part, out_part in ((lambda s: s[:, ::2], lambda s: s[:, 1::2]), (lambda s: s[:, :16], lambda s: s[:, 16:])):
        memory = torch.randn(4, 32)
        expected = dr.fwht(x_part(memory).clone())
        dr.fwht(x_part(memory), out=out_part(memory))
        torch.testing.assert_close(out_part(memory), expected)


def test_out_on_meta_and_empty_tensors_and_forward_mode_tangents():
    assert dr.fwht(torch.empty(4, 8, device="meta"), out=torch.empty(8, 4, device="meta").t()).shape == (4, 8)
    assert dr.fwht(torch.empty(3, 0), out=torch.empty(3, 0)[..., ::2]).shape == (3, 0)
    import torch.autograd.forward_ad as forward_ad

    primal, tangent = torch.randn(4, 16), torch.randn(4, 16)
    with forward_ad.dual_level():
        out = torch.empty(4, 16)
        dr.fwht(forward_ad.make_dual(primal, tangent), out=out)
        got = forward_ad.unpack_dual(out)
    torch.testing.assert_close(got.primal, dr.fwht(primal))
    torch.testing.assert_close(got.tangent, dr.fwht(tangent))


def test_out_works_under_compile_and_vmap_and_inference_mode():
    x = torch.randn(8, 64)
    out = torch.empty_like(x)
    compiled = torch.compile(lambda a, b: dr.fwht(a, out=b), fullgraph=True)
    assert compiled(x, out) is out
    torch.testing.assert_close(out, dr.fwht(x))
    # dynamic shapes (the second size recompiles with symbolic sizes); a tuple of dims too
    dynamic = torch.compile(lambda a, b: dr.fwht(a, dim=(0, 1), out=b))
    for rows, n in ((16, 8), (32, 16)):
        a, b = torch.randn(rows, n), torch.empty(rows, n)
        dynamic(a, b)
        torch.testing.assert_close(b, dr.fwht(a, dim=(0, 1)))
    batched = torch.empty_like(x)
    torch.func.vmap(lambda a, b: dr.fwht(a, out=b))(x, batched)
    torch.testing.assert_close(batched, dr.fwht(x))
    with torch.inference_mode():
        xi, oi = torch.randn(4, 16), torch.empty(4, 16)
        dr.fwht(xi, out=oi)
    torch.testing.assert_close(oi, dr.fwht(xi))


@pytest.mark.parametrize(
    ("make_out", "error", "match"),
    [
        (lambda x: torch.empty(4, 64, 11), ValueError,
         r"out has shape \(4, 64, 11\), expected x's shape \(4, 64, 12\)"),
        (lambda x: torch.empty_like(x, dtype=torch.float64), TypeError, "out has dtype torch.float64, expected"),
        (lambda x: torch.empty_like(x, device="meta"), ValueError, "out is on meta, expected x's device cpu"),
        (lambda x: [0.0], TypeError, "out must be a torch.Tensor, got list"),
        (lambda x: torch.zeros_like(x).to_sparse(), TypeError,
         "out must be a dense .strided. tensor, got a torch.sparse_coo"),
        (lambda x: torch.empty(1).expand(4, 64, 12), RuntimeError, "out has elements that share memory"),
        (lambda x: torch.empty_like(x).requires_grad_(), RuntimeError, "cannot be differentiated"),
    ],
)
def test_bad_out_is_refused_before_anything_is_written(make_out, error, match):
    x = torch.randn(4, 64, 12)
    out = make_out(x)
    snapshot = out.detach().clone() if isinstance(out, torch.Tensor) and out.device.type == "cpu" else None
    with pytest.raises(error, match=match):
        dr.fwht(x, dim=1, out=out)
    if snapshot is not None:  # unwritten (even uninitialised memory, NaN included, is left as it was)
        torch.testing.assert_close(out.detach(), snapshot, rtol=0, atol=0, equal_nan=True)


def test_out_sharing_part_of_x_or_with_inplace_or_a_bad_dim_or_grad_is_refused():
    memory = torch.randn(2048)
    with pytest.raises(ValueError, match="out shares memory with x without being x"):
        dr.fwht(memory[:1024], out=memory[512:1536])
    x = torch.randn(8, 64)
    out = torch.zeros(8, 64)
    with pytest.raises(ValueError, match="pass inplace=True or out=, not both"):
        dr.fwht(x, inplace=True, out=out)
    with pytest.raises(ValueError, match="dimension 2 has length 6"):  # a bad dim is named before out is touched
        dr.fwht(torch.randn(8, 64, 6), dim=2, out=torch.zeros(8, 64, 6))
    with pytest.raises(RuntimeError, match="cannot be differentiated"):
        dr.fwht(x.requires_grad_(), out=out)
    assert torch.equal(out, torch.zeros(8, 64))
    with torch.no_grad():  # as torch's out= functions, allowed without grad mode
        dr.fwht(x, out=out)
    torch.testing.assert_close(out, dr.fwht(x.detach()))


def test_a_negated_view_of_outs_memory_is_not_taken_for_x_itself():
    """fwht(torch._neg_view(t), out=t) has x at out's address with out's strides: it was taken as in place,
    the negation dropped (a review; complex.conj().imag makes such views)."""
    t = torch.randn(4, 16)
    expected = dr.fwht_reference(-t)
    dr.fwht(torch._neg_view(t), out=t)
    torch.testing.assert_close(t, expected)


def test_memory_shared_through_two_storages_is_seen():
    """Two torch.from_numpy views of one array have storages of their own: an out overlapping x that way was
    taken as apart and written while x was read (max error 4.9, a fuzzing helper found)."""
    import numpy as np

    array = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="out shares memory with x without being x"):
        dr.fwht(torch.from_numpy(array[0:32]), out=torch.from_numpy(array[8:40]))
    x, out = torch.from_numpy(array[:, :32]), torch.from_numpy(array[:, 16:48])  # ranges meet, with gaps
    expected = dr.fwht_reference(x.clone())
    dr.fwht(x, out=out)  # computed apart, then copied in
    torch.testing.assert_close(out, expected)
    same = torch.from_numpy(array[:8])
    expected = dr.fwht_reference(same.clone())
    assert dr.fwht(same, out=torch.from_numpy(array[:8])) is not None  # the same memory: in place
    torch.testing.assert_close(torch.from_numpy(array[:8]), expected)


def test_an_inference_tensor_out_is_refused_outside_inference_mode():
    with torch.inference_mode():
        out = torch.zeros(4, 16)
    with pytest.raises(RuntimeError, match=r"fwht\(out=...\): out is an inference tensor"):
        dr.fwht(torch.randn(4, 16), out=out)
    assert torch.equal(out, torch.zeros(4, 16))
