"""dreidel.fwht under PyTorch's tracing and transform tools that work at the dispatcher: make_fx, AOT
autograd, fake tensors, dispatch modes, functionalization and batched gradients. The eager CPU fast path
calls the kernel directly; these tools must see (and may rewrite) the registered op instead."""

import pytest
import torch
from functorch.compile import aot_function, nop
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

import dreidel as dr


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize(("shape", "dim", "inplace"), [((2, 8), -1, False), ((8, 3), 0, False), ((3, 384), -1, True)])
def test_make_fx_records_the_op_and_its_graph_computes_the_transform(tracing_mode, shape, dim, inplace, generator):
    def f(t):
        return dr.fwht(t.clone(), dim=dim, inplace=True) if inplace else dr.fwht(t, dim=dim)

    graph = make_fx(f, tracing_mode=tracing_mode)(torch.randn(shape, generator=generator))
    assert "dreidel.fwht" in graph.code
    other = torch.randn(shape, generator=generator)
    torch.testing.assert_close(graph(other), dr.fwht_reference(other, dim=dim))


def test_aot_autograd_and_fake_tensors(generator):
    x = torch.randn(4, 12, generator=generator, requires_grad=True)
    compiled = aot_function(lambda t: dr.fwht(t), nop)
    y = compiled(x)
    torch.testing.assert_close(y, dr.fwht_reference(x.detach()))
    y.sum().backward()
    torch.testing.assert_close(x.grad, dr.fwht_reference(torch.ones(4, 12)))
    with FakeTensorMode():
        fake = dr.fwht(torch.randn(3, 12))
        assert fake.shape == (3, 12) and fake.dtype == torch.float32


@pytest.mark.parametrize("n", [12, 20 * 4, 28 * 2])
def test_the_reference_runs_under_fake_tensors_and_make_fx(n, generator):
    """Its H_m factor is a cached real tensor, which FakeTensorMode refused to mix with its fake ones."""
    with FakeTensorMode():
        fake = dr.fwht_reference(torch.randn(3, n))
        assert fake.shape == (3, n) and fake.dtype == torch.float32
        assert dr.fwht_reference(torch.randn(2, n, n), dim=(1, 2)).shape == (2, n, n)
    x = torch.randn(3, n, dtype=torch.float64, generator=generator)
    graph = make_fx(lambda t: dr.fwht_reference(t), tracing_mode="fake")(x)
    torch.testing.assert_close(graph(x), x @ dr.hadamard_matrix(n).T / n**0.5)


def test_dispatch_modes_see_the_op(generator):
    with RecordOps() as record:
        dr.fwht(torch.randn(2, 8, generator=generator))
        dr.fwht(torch.randn(2, 8, generator=generator), inplace=True)
    assert "dreidel.fwht.default" in record.ops and "dreidel.fwht_.default" in record.ops


@pytest.mark.parametrize("inplace", [False, True])
def test_functionalize(inplace, generator):
    x = torch.randn(4, 8, generator=generator)
    f = (lambda t: dr.fwht(t.clone(), inplace=True)) if inplace else dr.fwht
    torch.testing.assert_close(torch.func.functionalize(f)(x), dr.fwht_reference(x))


@pytest.mark.parametrize("n", [8, 12])
def test_batched_gradients(n, generator):
    x = torch.randn(n, dtype=torch.float64, generator=generator, requires_grad=True)
    h = dr.hadamard_matrix(n) / n**0.5
    (rows,) = torch.autograd.grad(dr.fwht(x), x, torch.eye(n, dtype=torch.float64), is_grads_batched=True)
    torch.testing.assert_close(rows, h)
    for strategy in ("reverse-mode", "forward-mode"):
        jacobian = torch.autograd.functional.jacobian(dr.fwht, x.detach(), vectorize=True, strategy=strategy)
        torch.testing.assert_close(jacobian, h)
    assert torch.autograd.gradcheck(dr.fwht, (x,), check_batched_grad=True, check_forward_ad=True,
                                    check_batched_forward_grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_registered_op_takes_low_precision_and_checks_lengths(dtype, generator):
    x = torch.randn(3, 384, generator=generator).to(dtype)
    torch.testing.assert_close(torch.ops.dreidel.fwht(x, True), dr.fwht(x))
    with pytest.raises(ValueError, match="length 5,.*pad_to_hadamard"):
        torch.ops.dreidel.fwht(torch.randn(2, 5), True)
    torch.library.opcheck(torch.ops.dreidel.fwht.default, (x.float(), True))


def test_the_in_place_op_refuses_what_it_cannot_differentiate():
    """dreidel::fwht_ has no gradient: called on a tensor that requires grad it used to transform it (a leaf
    overwritten, a computed tensor's gradient silently the identity)."""
    leaf = torch.randn(2, 8, requires_grad=True)
    for x in (leaf, leaf * 1):
        with pytest.raises(RuntimeError, match="dreidel::fwht_: x requires grad"):
            torch.ops.dreidel.fwht_(x, True)
    before = leaf.detach().clone()
    with torch.no_grad():
        torch.ops.dreidel.fwht_(leaf, True)
    torch.testing.assert_close(leaf.detach(), dr.fwht_reference(before))


def test_forward_mode_tangents_are_carried_or_refused_never_dropped(generator):
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(2, 8, generator=generator), torch.randn(2, 8, generator=generator)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="dreidel::fwht: an input carries a forward-mode tangent"):
            torch.ops.dreidel.fwht(fwAD.make_dual(x, t), True)
        with pytest.raises(RuntimeError, match="dreidel::fwht_: an input carries a forward-mode tangent"):
            torch.ops.dreidel.fwht_(fwAD.make_dual(x.clone(), t), True)
        dual, dual_inplace = fwAD.make_dual(x, t.clone()), fwAD.make_dual(x.clone(), t.clone())  # copy_ writes tangents
        with RecordOps():  # under a dispatch mode dreidel.fwht took the op, whose tangent came back None
            result = dr.fwht(dual)
            dr.fwht(dual_inplace, inplace=True)
        out, inplace = fwAD.unpack_dual(result), fwAD.unpack_dual(dual_inplace)
    for result in (out, inplace):
        torch.testing.assert_close(result.primal, dr.fwht_reference(x))
        torch.testing.assert_close(result.tangent, dr.fwht_reference(t))


@pytest.mark.parametrize("x, error", [(torch.tensor(3), TypeError), (torch.zeros((), dtype=torch.complex64), TypeError),
                                      (torch.empty(3, 6, device="meta"), ValueError),
                                      (torch.empty(3, 8, dtype=torch.int64, device="meta"), TypeError)])
def test_the_registered_ops_check_their_input_as_fwht_does(x, error):
    # a 0-d integer tensor came back as it was; meta (and fake) tensors of any length or dtype were accepted
    with pytest.raises(error):
        torch.ops.dreidel.fwht(x, True)
    with pytest.raises(error):
        torch.ops.dreidel.fwht_(x.clone(), True)


def test_a_default_device_does_not_move_the_hadamard_factors(generator):
    # torch.device("meta") as a context made the cached factors' builder run on meta (and fail)
    x = torch.randn(3, 24, generator=generator)
    with torch.device("meta"):
        y, reference = dr.fwht(x), dr.fwht_reference(x)
        h = dr.hadamard_matrix(24)
    assert h.device.type == "meta" and h.shape == (24, 24)
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(y.double(), x.double() @ dr.hadamard_matrix(24).T / 24 ** 0.5)
