"""The fast Walsh-Hadamard transform as a PyTorch op.

``fwht`` is registered with ``torch.library.custom_op`` (``dreidel::fwht``): it has a fake implementation
for meta tensors and ``torch.compile``, and autograd through the transform itself, since ``H`` is symmetric
(and orthogonal when normalized). On CPU it runs the native kernel; on every other device it runs
``fwht_reference``, the pure-PyTorch butterfly that is also the test oracle. In eager mode on CPU,
``fwht`` skips the custom-op dispatch (tens of microseconds a call): a contiguous input with no gradient
to record goes straight to the kernel, one that records a gradient through a plain
``autograd.Function``; all paths compute bit-identical results (tested). Tools that record or rewrite ops
at the dispatcher (``make_fx``, fake tensors, dispatch modes, functionalization) always get the op.

Order convention: see ``dreidel.algo.hadamard_matrix`` (``H_m ⊗ H_{2^k}``, Sylvester natural order).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import torch

from dreidel._native import native
from dreidel.algo._hadamard import (
    HADAMARD_FACTORS,
    MAX_POW2_LOG2,
    hadamard_factor,
    nearest_hadamard_lengths,
    small_hadamard,
    small_hadamard_array,
)

__all__ = ["fwht", "fwht_into", "fwht_reference", "in_functorch_transform", "pad_to_hadamard", "runs_native_eager"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_NATIVE_DTYPES = (torch.float32, torch.float64)
# Bound once: each attribute lookup on the way to the kernel is a cache miss when the caches are cold.
_get_num_threads = torch.get_num_threads
_is_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
# torch.jit.is_tracing and torch.autograd.graph.increment_version without their Python wrappers (one frame
# fewer each; dreidel's ops are not TorchScript-scriptable, so the wrappers' is_scripting branch never applies).
_is_tracing = torch._C._is_tracing
_forward_ad = torch.autograd.forward_ad
_increment_versions = torch._C._increment_version  # takes a sequence of tensors (a tensor is one too: of its rows)
# True inside torch.func transforms (vmap, grad, jvp, jacrev, ...), whose wrapper tensors have no data pointer.
in_functorch_transform = torch._C._are_functorch_transforms_active
_dispatch_modes_active = torch._C._len_torch_dispatch_stack
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor  # autograd.grad(is_grads_batched=True), ...
_is_functional = torch._is_functional_tensor  # torch.func.functionalize's wrappers
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead  # a torch.func wrapper whose transform has returned
_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def _dispatches_plainly(x: torch.Tensor) -> bool:
    """Whether ``x``'s ops reach torch's own kernels untouched, so a raw kernel call may stand in for one.

    Not so under a ``TorchDispatchMode`` (``make_fx``, ``aot_function``, ``FakeTensorMode``, op loggers),
    for a subclass that intercepts dispatch (``FakeTensor``), a legacy-vmap batched tensor (batched
    gradients: ``is_grads_batched``, ``jacobian(vectorize=True)``) or a functionalized one: those record or
    rewrite ops and would never see a raw call (``make_fx`` then traced a graph returning uninitialised
    memory), and the last three have no memory of their own. They take the registered op or the reference.
    """
    return (
        _dispatch_modes_active() == 0
        and type(x).__torch_dispatch__ is _PLAIN_DISPATCH
        and not _is_legacy_batched(x)
        and not _is_functional(x)
    )


def _as_dim(dim: object, expected: str = "an int", name: str = "dim") -> int:
    """``dim`` as a Python int (any integer type: ``operator.index``); bools and non-integers are refused, the
    message saying what ``name`` was ``expected`` to be."""
    if isinstance(dim, bool):
        raise TypeError(f"{name} must be {expected}, got bool")
    try:
        return operator.index(dim)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {type(dim).__name__}") from None


def _is_dim_sequence(dim: object) -> bool:
    """Whether ``dim`` names several dimensions: a tuple or list (``torch.Size`` included), as torch.fft.fftn's."""
    return isinstance(dim, (tuple, list))


def _checked_dims(x: torch.Tensor, dims: tuple | list, op: str) -> list[int]:
    """The dimensions of a ``dim`` sequence as ints, each checked as a single ``dim`` is (type, range, length),
    and distinct: before anything is transformed, so an in-place call never stops half done."""
    _check_tensor(x)
    checked = [_as_dim(d, "an int", "each entry of dim") for d in dims]
    for d in checked:
        _check_dim(x, d, op)
    rank = max(x.dim(), 1)  # a 0-d tensor is a vector of length 1
    if len({d % rank for d in checked}) != len(checked):
        raise ValueError(f"{op}: dim must name distinct dimensions, got {tuple(checked)}")
    return checked


def _overlap_from_strides(x: torch.Tensor) -> bool | None:
    """Whether two elements of the strided ``x`` share memory, where its sizes and strides alone settle it
    (``None`` where they do not).

    Dimensions sorted by stride, each stride passing the reach of the smaller ones proves there is no overlap
    (every ordinary view: slices, transposes, steps). More elements than addresses in the view's span prove
    one (an expanded view: 2^28 elements over 256 KB used to build a 2 GB table of offsets first).
    """
    # Sorted by insertion, not sorted(): under torch.compile a size or stride may be symbolic, which dynamo
    # compares (adding a guard) but will not sort.
    by_stride: list[tuple[int, int]] = []
    for size, stride in zip(x.shape, x.stride()):
        if size > 1:
            at = len(by_stride)
            while at > 0 and by_stride[at - 1][0] > stride:
                at -= 1
            by_stride.insert(at, (stride, size))
    reach = 0
    for stride, size in by_stride:
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    if x.numel() > sum(stride * (size - 1) for size, stride in zip(x.shape, x.stride())) + 1:
        return True
    return None


def _overlaps_itself(x: torch.Tensor) -> bool:
    """Whether two elements of the strided ``x`` share memory (an expanded, ``unfold`` or ``as_strided`` view):
    ``_overlap_from_strides``, and for the layouts it does not settle, a table of offsets no larger than the
    view's span."""
    settled = _overlap_from_strides(x)
    if settled is not None:
        return settled
    offsets = torch.zeros((), dtype=torch.long, device="cpu")  # not on a default device set to meta (no values)
    for size, stride in zip(x.shape, x.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size, device="cpu") * stride
    return offsets.unique().numel() != x.numel()


def _refuse_flags(**flags: object) -> None:
    """Raise TypeError naming the first flag that is not a bool (a truthy string would otherwise pass)."""
    for name, value in flags.items():
        kind = type(value)
        if kind is not bool:
            kind_name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            raise TypeError(f"{name} must be a bool, got {kind_name} {value!r:.40}")


def _check_tensor(x: torch.Tensor) -> None:
    """Refuse what is not a dense real floating-point tensor (TypeError)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _NATIVE_DTYPES and x.dtype not in _LOW_PRECISION:
        raise TypeError(
            f"x must be a real floating-point tensor (float32, float64, float16, bfloat16), got {x.dtype}"
        )
    if x.layout != torch.strided or x.is_nested:
        layout = "nested" if x.is_nested else str(x.layout)
        raise TypeError(f"x must be a dense (strided) tensor, got a {layout} one; convert it with .to_dense()")


def _check_input(x: torch.Tensor, dim: int, op: str = "fwht") -> int:
    """Validate ``x`` and ``dim`` (messages about the length name ``op``); return the length of the transformed
    dimension."""
    _check_tensor(x)
    return _check_dim(x, dim, op)


def _check_dim(x: torch.Tensor, dim: int, op: str) -> int:
    """Validate ``dim`` of the checked tensor ``x`` (range, supported length); return the length."""
    if x.dim() == 0:  # a scalar is a vector of length 1, as torch reductions treat it: dim 0 or -1
        if dim not in (0, -1):
            raise ValueError(f"dim={dim} is out of range for a 0-d tensor (expected 0 or -1)")
        return 1
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    n = int(x.shape[dim])  # an int even under torch.jit.trace, where sizes are traced values
    if n != 0 and hadamard_factor(n) is None:
        below, above = nearest_hadamard_lengths(n)
        nearest = ", ".join(str(v) for v in (below, above) if v is not None)
        remedy = (f"Use dreidel.pad_to_hadamard(x, dim={dim}) to zero-pad." if above is not None
                  else "It is longer than the longest supported length; split it.")
        raise ValueError(
            f"{op}: dimension {dim} has length {n}, which is not a supported Hadamard length "
            f"(m * 2^k with m in {HADAMARD_FACTORS}, 2^k <= 2^30). Nearest supported lengths: {nearest}. {remedy}"
        )
    return n


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def _scale(n: int, normalized: bool) -> float:
    return 1.0 / math.sqrt(n) if normalized else 1.0


def _reference_last_dim(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The transform along the last dimension, always in new memory (the op's default kernel, whose result
    torch.library forbids to alias its input)."""
    if x.dim() == 0:
        return _reference_last_dim(x.reshape(1), normalized).reshape(())
    n = x.shape[-1]
    if x.numel() == 0 or (n == 1 and not normalized):  # nothing to compute
        return x.clone()
    m, chunk = hadamard_factor(n)
    rows = x.numel() // n
    y = x.reshape(rows, m, chunk)
    h = 1
    while h < chunk:
        pairs = y.reshape(rows, m, chunk // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    y = y.reshape(rows, m, chunk)
    if m > 1:
        hm = small_hadamard(m, y.dtype)
        # Made under a dispatch mode, as a FakeTensorMode's tensors must be (not a real one). Not asked under
        # torch.compile, which lifts the real constant (and breaks its graph on the question).
        if not _is_compiling() and _dispatch_modes_active():
            hm = torch.tensor(hm.tolist(), dtype=y.dtype)
        hm = hm.to(y.device)
        y = hm @ y  # (m, m) @ (rows, m, chunk): matmul, unlike einsum, has a legacy-vmap batching rule
    if normalized:
        y = y * _scale(n, True)
    return y.reshape(x.shape)


def fwht_reference(
    x: torch.Tensor, dim: int | tuple[int, ...] | list[int] = -1, normalized: bool = True
) -> torch.Tensor:
    """Pure-PyTorch FWHT: ``log2(2^k)`` butterfly stages, then ``H_m`` by a matrix product. Any device, any float
    dtype.

    Same contract as :func:`fwht` (without ``inplace``); float16/bfloat16 are computed in float32.
    """
    if type(normalized) is not bool:
        _refuse_flags(normalized=normalized)
    if _is_dim_sequence(dim):
        dims = _checked_dims(x, dim, "fwht_reference")
        out = x.to(_compute_dtype(x.dtype))  # float16/bfloat16: float32 over every dim, rounded once
        for d in dims:
            out = fwht_reference(out, d, normalized)
        return x.clone() if out is x else out.to(x.dtype)
    dim = _as_dim(dim, "an int or a tuple of ints")
    n = _check_input(x, dim, "fwht_reference")
    if x.numel() == 0 or n == 0:
        return x.clone()
    if x.dim() == 0:
        return fwht_reference(x.unsqueeze(0), -1, normalized).squeeze(0)
    moved = x.movedim(dim, -1).to(_compute_dtype(x.dtype))
    return _reference_last_dim(moved, normalized).to(x.dtype).movedim(-1, dim)


class _KernelConstants(NamedTuple):
    """What the native kernel needs besides the data, per (length, dtype): see ``kernel_constants``."""

    hadamard_m: object  # the m x m factor as a read-only NumPy array; keeps hadamard_m_address valid
    hadamard_m_address: int
    m: int
    normalized_scale: float
    float64: bool


@functools.lru_cache(maxsize=None)
def kernel_constants(n: int, dtype: torch.dtype) -> _KernelConstants | None:
    """The kernel's constants for a supported length ``n`` and a native dtype, else ``None`` (cached)."""
    factor = hadamard_factor(n)
    if factor is None or dtype not in _NATIVE_DTYPES:
        return None
    hadamard_m = small_hadamard_array(factor[0], dtype)
    return _KernelConstants(
        hadamard_m, hadamard_m.ctypes.data, factor[0], _scale(n, True), dtype == torch.float64
    )


def _run_kernel(
    src_address: int, dst_address: int, rows: int, n: int, constants: _KernelConstants, normalized: bool,
    interleave: int = 1,
) -> None:
    """The native transform of ``rows x n`` contiguous values at ``src_address`` into ``dst_address`` (with
    ``interleave`` c > 1: ``rows`` blocks of ``n x c`` values, each transformed along its ``n``, value i of
    column j at i * c + j; see ``_interleaved_layout``).

    The callers have checked the tensors behind the addresses (see ``fwht_into``). Raw addresses rather
    than NumPy views or DLPack: right after a large memory operation (the usual case: the input was just
    computed) every distinct piece of Python and torch code on the way to the kernel runs from cold caches,
    at several microseconds each, and a view per call made a 16 MB in-place transform 7% slower
    (csrc/module.cc). Hence also the few tensor attributes the callers read.
    """
    _, hadamard_m_address, m, normalized_scale, float64 = constants
    scale = normalized_scale if normalized else 1.0
    native.fwht_at(src_address, dst_address, rows, n, hadamard_m_address, m, scale, _get_num_threads(), float64,
                   interleave)


def _interleaved_layout(shape: tuple[int, ...], strides: tuple[int, ...], dim: int, element_size: int,
                        contiguous: bool) -> tuple[int, int] | None:
    """``(rows, interleave)`` when the kernel can transform a tensor of this ``shape`` and ``strides`` along
    ``dim`` (in range, not negative) where its values lie: its elements fill its memory without gaps or
    overlaps in some order of the dimensions (``contiguous``, or a permutation of a contiguous tensor: a
    transpose, ``channels_last``), so the memory is ``rows`` blocks of ``n x interleave`` values with the
    ``n`` values of each transform ``interleave`` apart (``interleave = stride(dim)``). ``None`` otherwise,
    and where ``interleave`` is not a multiple of a cache line's values (16 float32, 8 float64): the kernel's
    strips of columns are multiples of a SIMD register, and a narrower rest of each row would run scalar (an
    ``interleave`` of 2 to 12 float32 measured up to 6x slower than transposing through a contiguous copy,
    on a Xeon with AVX-512).

    Along such a dimension the transform costs about one pass over memory where a strip of 1 KB of every
    one of the ``n`` rows fits in a quarter of L2, two otherwise (csrc/fwht.cc, ``run_interleaved``): on a
    Xeon with AVX-512, 1 thread, float32 in place, 4096 x 1024 along dim 0 in 1.9 ms against 24 ms through a
    contiguous copy and back, (32, 256, 1024) along dim 1 in 2.2 ms against 26 ms.
    """
    n = shape[dim]
    if 0 in shape:  # nothing to transform: the general path returns it
        return None
    if not contiguous:
        expected = 1  # dense: each dimension's stride is the product of the sizes of those with smaller strides
        for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz != 1):
            if stride != expected:
                return None
            expected *= size
    if n == 1:  # a copy, times 1: a dense layout is rows of one value
        interleave = 1
    else:
        interleave = math.prod(shape[dim + 1:]) if contiguous else strides[dim]
    if interleave != 1 and (interleave * element_size) % 64 != 0:
        return None
    return math.prod(shape) // (n * interleave), interleave


def _kernel_can_take(t: torch.Tensor) -> bool:
    """Whether the kernel can work on ``t``'s memory as it is: contiguous, no lazy negation, and aligned to
    its element size (``torch.frombuffer`` can make tensors that are not)."""
    return t.is_contiguous() and not t.is_neg() and t.data_ptr() % t.element_size() == 0


def _kernel_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a tensor the kernel can take: ``t`` itself if it is one, else a fresh contiguous copy."""
    if _kernel_can_take(t):
        return t
    t = t.resolve_neg().contiguous()
    return t if t.data_ptr() % t.element_size() == 0 else t.clone()


# Results of at least this many bytes go onto transparent huge pages (see _empty_result): 32 MB is glibc's
# largest mmap threshold, so such a block is usually a fresh mapping of its own.
_HUGE_PAGE_RESULT_BYTES = 32 << 20


def _empty_result(src: torch.Tensor) -> torch.Tensor:
    """A fresh tensor like ``src`` (contiguous, or dense in another order of its dimensions: then with its
    strides) for the kernel to write the transform into.

    A block of tens of megabytes usually comes fresh from the OS on every allocation, and its first write
    then page-faults every 4 KB; advised onto 2 MB pages first (``madvise``; it takes effect where Linux's
    THP setting is "madvise"), it faults 512 times less often. Measured on a Xeon with AVX-512, float32, out
    of place into a fresh result, against no advice: in the harness of ``benchmarks/fwht.py`` 1.46-1.87x
    faster at 1 thread (a 2^24 row, 2^20 rows of 8, 384- and 1536-wide rows) and 1.05-1.14x at 2; in a plain
    loop, 1.21-1.69x at 1 thread and 0.96-1.37x at 2 (the 2^24 row 0.96x: two threads fault 4 KB pages in
    parallel, while each 2 MB page is zeroed by the one thread that faults it). PyTorch offers the same for
    all of its allocations, process-wide, through ``THP_MEM_ALLOC_ENABLE=1``. The advice changes no
    contents; where glibc carved the block from free heap memory instead, that part of the heap stays
    eligible for huge pages afterwards.
    """
    out = torch.empty_like(src)
    if out.nbytes >= _HUGE_PAGE_RESULT_BYTES:
        native.advise_huge_pages(out.data_ptr(), out.nbytes)
    return out


def _fwht_into_problems(src: torch.Tensor, dst: torch.Tensor) -> list[str]:
    """What keeps the kernel from taking ``src`` and ``dst`` (for fwht_into's error), each naming its tensor."""
    problems = []
    if src.dtype not in _NATIVE_DTYPES:
        problems.append(f"src has dtype {src.dtype} (expected float32 or float64; dreidel.fwht takes the others)")
    elif dst.dtype != src.dtype:
        problems.append(f"dst has dtype {dst.dtype}, src {src.dtype} (expected the same)")
    if dst.shape != src.shape:
        problems.append(f"dst has shape {tuple(dst.shape)}, src {tuple(src.shape)} (expected the same)")
    if src.dim() == 0:
        problems.append("src is 0-d (expected a last dimension to transform)")
    elif hadamard_factor(int(src.shape[-1])) is None:
        problems.append(f"src's last dimension has length {int(src.shape[-1])}, which is not a supported Hadamard "
                        "length (see dreidel.pad_to_hadamard)")
    for name, t in (("src", src), ("dst", dst)):
        if not t.is_cpu:
            problems.append(f"{name} is on {t.device} (expected cpu)")
        if not t.is_contiguous():
            problems.append(f"{name} is not contiguous (call .contiguous())")
        if t.is_neg():
            problems.append(f"{name} is a lazily negated view (call .resolve_neg())")
        try:
            misaligned = t.data_ptr() % t.element_size() != 0
        except RuntimeError:  # no storage (sparse, a torch.func wrapper)
            problems.append(f"{name} has no memory of its own (a sparse tensor, or one inside a torch.func transform)")
        else:
            if misaligned:
                problems.append(f"{name}'s address is not aligned to its element size")
    return problems


def fwht_into(src: torch.Tensor, dst: torch.Tensor, normalized: bool = True) -> None:
    """Raw native transform along the last dim: ``dst = fwht(src)``, no autograd, no op dispatch.

    For layer implementations that write their own backward and call the transform many times on small
    tensors. ``src`` and ``dst`` must be contiguous CPU float32/float64 tensors of the same shape and dtype,
    aligned to their element size (they may be the same tensor, but must not otherwise overlap) whose last
    dimension is a supported length; anything else raises ``ValueError`` before the kernel runs. Like an
    in-place torch op, it bumps ``dst``'s version counter (autograd then refuses ``dst`` if it was saved for
    a backward pass) and refuses (``RuntimeError``) an inference tensor outside inference mode and, while
    grad mode is on, a ``dst`` that requires grad (a leaf, a view of one, or a computed tensor, whose graph
    would not know of the change).
    """
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        raise TypeError(f"fwht_into: src and dst must be tensors, got {type(src).__name__} and {type(dst).__name__}")
    if type(normalized) is not bool:
        _refuse_flags(normalized=normalized)
    n = int(src.size(-1)) if src.ndim > 0 else 0  # int(): sizes are traced values under torch.jit.trace
    constants = kernel_constants(n, src.dtype)
    try:
        kernel_takes = constants is not None and (
            src.is_cpu
            and dst.is_cpu
            and dst.dtype == src.dtype
            and dst.shape == src.shape
            and src.is_contiguous()
            and dst.is_contiguous()
            and not src.is_neg()
            and not dst.is_neg()
            and src.data_ptr() % src.element_size() == 0
            and dst.data_ptr() % dst.element_size() == 0
        )
    except RuntimeError:  # a tensor without storage (sparse, a torch.func wrapper): named below
        kernel_takes = False
    if not kernel_takes:
        raise ValueError(
            f"fwht_into: {'; '.join(_fwht_into_problems(src, dst))}. src and dst must be contiguous CPU "
            "float32/float64 tensors of one shape and dtype whose last dimension is a supported Hadamard length"
        )
    src_address, dst_address, nbytes = src.data_ptr(), dst.data_ptr(), src.nbytes
    if src_address != dst_address and src_address < dst_address + nbytes and dst_address < src_address + nbytes:
        raise ValueError("fwht_into: src and dst overlap without being the same memory")
    if dst.is_inference():
        _check_inference_update(dst, "fwht_into: dst")
    if dst.requires_grad and _is_grad_enabled():
        raise RuntimeError("fwht_into: dst requires grad, and fwht_into records nothing for autograd (a leaf, or a "
                           "view of one, would change behind its back; a computed tensor would get a wrong "
                           "gradient); call it under torch.no_grad(), or use dreidel.fwht")
    _increment_versions((dst,))
    _run_kernel(src_address, dst_address, int(src.numel()) // n, n, constants, normalized)


@torch.library.custom_op("dreidel::fwht", mutates_args=())
def _fwht_op(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Transform along the last dimension; the default implementation (non-CPU devices) is the reference."""
    _check_input(x, -1)
    _refuse_a_tangent(x, "dreidel::fwht")
    return _reference_last_dim(x, normalized).contiguous()


def _op_input_needs_care(x: torch.Tensor) -> bool:
    """True when the ops' CPU kernels cannot hand ``x`` straight to the native kernel: an empty or 0-d tensor,
    or float16/bfloat16. A length or dtype the kernel refuses raises (``_check_input`` says why), empty, 0-d
    or not, as ``dreidel.fwht`` does."""
    _check_input(x, -1)
    return x.dim() == 0 or x.numel() == 0 or x.dtype in _LOW_PRECISION


def has_forward_tangent(x: torch.Tensor) -> bool:
    """Whether ``x`` carries a forward-mode (``torch.autograd.forward_ad``) tangent at the current level."""
    return _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(x).tangent is not None


def _refuse_a_tangent(x: torch.Tensor, op: str, instead: str = "dreidel.fwht") -> None:
    """The registered ops have no forward-mode formula (``torch.library`` takes none): a tangent on ``x`` would
    be dropped without a word, so it is refused, pointing at ``instead``, which carries tangents by other
    paths."""
    if has_forward_tangent(x):
        raise RuntimeError(f"{op}: an input carries a forward-mode tangent, which this op cannot propagate; use "
                           f"{instead}, which does")


def _check_op_input_shape(x: torch.Tensor) -> None:
    """The ops' fake implementations (torch.compile, meta tensors) refuse what their kernels refuse: a dtype, or a
    length known at trace time, that is not supported (a symbolic length is left to the kernel)."""
    if x.dim() > 0 and not isinstance(x.shape[-1], int):
        if x.dtype not in _NATIVE_DTYPES and x.dtype not in _LOW_PRECISION:
            _check_input(x, -1)  # raises the dtype error
        return
    _check_input(x, -1)


@_fwht_op.register_kernel("cpu")
def _fwht_op_cpu(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    """Out of place on CPU: ``_transform_cpu``, its result contiguous (as the fake implementation says)."""
    if _op_input_needs_care(x):  # called directly as torch.ops.dreidel.fwht; dreidel.fwht never gets here
        if x.dim() == 0 or x.numel() == 0:
            return x.clone(memory_format=torch.contiguous_format)  # length 1 (0-d) or nothing to transform
        return _fwht_op_cpu(x.to(torch.float32), normalized).to(x.dtype)
    _refuse_a_tangent(x, "dreidel::fwht")
    return _transform_cpu(x, normalized).contiguous()


def _transform_cpu(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The transform of the CPU float32/float64 tensor ``x`` along its last dimension into a fresh tensor, in one
    pass: read where it lies into a tensor of its layout where the kernel can (``_interleaved_layout``: a
    dense layout, a dimension other than the last in memory included; not a lazily negated view), else from a
    contiguous copy into a contiguous tensor."""
    n = x.shape[-1]
    layout = None
    if not x.is_neg() and x.data_ptr() % x.element_size() == 0:
        layout = _interleaved_layout(x.shape, x.stride(), x.dim() - 1, x.element_size(), x.is_contiguous())
    if layout is None:
        src = _kernel_copy(x)  # a lazily negated view is materialised, not read as raw memory
        out = _empty_result(src)
        fwht_into(src, out, normalized)
        return out
    rows, interleave = layout
    out = _empty_result(x)
    _run_kernel(x.data_ptr(), out.data_ptr(), rows, n, kernel_constants(n, x.dtype), normalized, interleave)
    return out


@_fwht_op.register_fake
def _fwht_op_fake(x: torch.Tensor, normalized: bool) -> torch.Tensor:
    _check_op_input_shape(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fwht_setup_context(ctx, inputs, output) -> None:
    ctx.normalized = inputs[1]


def _fwht_backward(ctx, grad: torch.Tensor):
    # H is symmetric, so the vector-Jacobian product is the same transform of the incoming gradient.
    return _fwht_op(grad, ctx.normalized), None


_fwht_op.register_autograd(_fwht_backward, setup_context=_fwht_setup_context)


@torch.library.custom_op("dreidel::fwht_", mutates_args=("x",))
def _fwht_inplace_op(x: torch.Tensor, normalized: bool) -> None:
    _check_input(x, -1)
    _refuse_a_tangent(x, "dreidel::fwht_")
    x.copy_(_reference_last_dim(x, normalized))


def _fwht_inplace_op_autograd(x: torch.Tensor, normalized: bool) -> None:
    """``dreidel::fwht_`` at the Autograd key: the op has no gradient (``torch.library`` takes no formula for an
    op that mutates its input), so with grad mode on a tensor that requires grad is refused, as torch's in-place
    ops refuse what they cannot differentiate; it used to be transformed, a leaf overwritten and a computed
    tensor's gradient silently the identity. Otherwise the op runs below autograd (its version bump included)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("dreidel::fwht_: x requires grad, and the in-place op has no gradient; use "
                           "dreidel::fwht (out of place), or run under torch.no_grad()")
    with torch._C._AutoDispatchBelowAutograd():
        return _fwht_inplace_op(x, normalized)


_OP_OVERRIDES = torch.library.Library("dreidel", "FRAGMENT")
_OP_OVERRIDES.impl("fwht_", _fwht_inplace_op_autograd, "Autograd", allow_override=True)


@_fwht_inplace_op.register_kernel("cpu")
def _fwht_inplace_op_cpu(x: torch.Tensor, normalized: bool) -> None:
    _refuse_a_tangent(x, "dreidel::fwht_")
    if _op_input_needs_care(x):
        if x.dim() > 0 and x.numel() > 0:
            x.copy_(_fwht_op_cpu(x.to(torch.float32), normalized))
        return
    work = _kernel_copy(x)
    fwht_into(work, work, normalized)
    if work is not x:
        x.copy_(work)  # through x's strides and negation bit


@_fwht_inplace_op.register_fake
def _fwht_inplace_op_fake(x: torch.Tensor, normalized: bool) -> None:
    _check_op_input_shape(x)
    return None


class _EagerFwht(torch.autograd.Function):
    """The eager CPU path: the native kernel behind a plain autograd.Function, along the last dimension.

    Same maths as the ``dreidel::fwht`` custom op (which ``torch.compile``, meta tensors and other devices
    use) at a fraction of the dispatch cost; the backward applies the same function, so higher-order
    gradients work too. It also carries ``torch.func`` transforms (``setup_context`` style, a vmap rule),
    which the custom op's generated autograd does not.
    """

    @classmethod
    def apply(cls, x: torch.Tensor, normalized: bool) -> torch.Tensor:
        # torch's Function.apply fills in forward's default arguments through inspect.signature on every call of
        # a setup_context-style Function (about 20 of a small call's 45 µs on Zen 4); forward has none and is
        # always given both. Outside torch.func transforms the call therefore goes straight to torch's C apply,
        # after the one other thing Function.apply does there (a dead torch.func wrapper is unwrapped).
        if in_functorch_transform():
            return super().apply(x, normalized)
        return super(torch.autograd.Function, cls).apply(_unwrap_if_dead(x), normalized)

    @staticmethod
    def forward(x: torch.Tensor, normalized: bool) -> torch.Tensor:
        _refuse_a_tangent(x, "dreidel::fwht")
        return _transform_cpu(x, normalized)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.normalized = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Through the routing: with batched gradients the incoming one is a legacy-vmap batched tensor.
        return _last_dim(grad, ctx.normalized), None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, _normalized_tangent) -> torch.Tensor:
        # Forward-mode AD: the transform is linear, so the tangent goes through it too (a wrapper tensor under
        # torch.func.jvp, a batched one under jacobian(strategy="forward-mode", vectorize=True)).
        return _last_dim(x_tangent, ctx.normalized)

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, normalized: bool):
        # The transform runs along the last dimension, so a batch dimension anywhere else just rides along.
        if in_dims[0] is None:
            return _EagerFwht.apply(x, normalized), None
        return _EagerFwht.apply(x.movedim(in_dims[0], 0), normalized), 0


def _last_dim(work: torch.Tensor, normalized: bool) -> torch.Tensor:
    """The out-of-place transform of ``work`` (float32/float64, or any dtype off CPU) along its last dim, by
    the path that can carry it: eager CPU through ``_EagerFwht`` (``torch.func`` transforms included);
    batched gradients, ``torch.func`` transforms off CPU and forward-mode AD elsewhere (under a dispatch
    mode, say) through the reference's torch ops; everything
    else (other devices, ``torch.compile``, ``make_fx``, fake tensors, functionalization) through the
    registered op, which those tools see and rewrite.
    """
    if _is_compiling():  # torch.func transforms under torch.compile: the reference's ops, which both trace
        return _reference_last_dim(work, normalized) if in_functorch_transform() else _fwht_op(work, normalized)
    if work.is_cpu and work.dtype in _NATIVE_DTYPES and _dispatches_plainly(work):
        return _EagerFwht.apply(work, normalized)
    if (_is_legacy_batched(work) or (in_functorch_transform() and not _is_functional(work))
            or _forward_ad._current_level >= 0):  # the registered op drops tangents; torch's ops carry them
        return _reference_last_dim(work, normalized)
    return _fwht_op(work, normalized)


def runs_native_eager(*tensors: torch.Tensor | None) -> bool:
    """True when code is not being traced and every tensor given is a CPU float32/float64 tensor of one dtype
    (``None`` entries, e.g. an absent bias, are skipped; the first must be a tensor).

    Then the native kernels may be called directly (``fwht_into``, the fused spectral layers) instead of
    through custom ops, whose dispatch costs tens of microseconds a call. Traced code (``torch.compile``,
    ``torch.jit.trace``, which would not see a raw kernel call) and other devices or dtypes keep the
    registered ops and the reference paths; inside ``torch.func``
    transforms (whose wrapper tensors have no memory of their own), under a ``TorchDispatchMode`` and for
    tensors whose ops do not reach torch's kernels plainly (see ``_dispatches_plainly``) this is False too.
    """
    dtype = tensors[0].dtype
    if (_is_compiling() or _is_tracing() or dtype not in _NATIVE_DTYPES or in_functorch_transform()
            or _dispatch_modes_active() != 0):
        return False
    for t in tensors:  # is_cpu: no device object per call
        if t is not None and not (t.is_cpu and t.dtype == dtype and _dispatches_plainly(t)):
            return False
    return True


def _direct_kernel_args(x: torch.Tensor, dim: int) -> tuple[int, int, int, _KernelConstants, int] | None:
    """``(rows, n, interleave, constants, address)`` when ``x`` can go straight to the kernel, else ``None``.

    Straight to the kernel: a non-empty CPU float32/float64 tensor (aligned, without a lazy negation bit)
    transformed along a dimension of a supported length where its values lie in memory (contiguous, or dense
    in another order of its dimensions: see ``_interleaved_layout``), with no gradient to record, outside
    ``torch.compile``, ``torch.func`` transforms and anything else that records or rewrites ops
    (``_dispatches_plainly``). Everything else takes the general path, which checks the input (with its error
    messages) and dispatches.
    """
    # First, so that torch.compile does not trace the rest. The tracers, dispatch modes, dispatch-intercepting
    # subclasses and forward-mode AD record ops, and the raw kernel call is none: they take the general path
    # (forward AD: _EagerFwht's jvp). The two checks here are the cheap part of _dispatches_plainly.
    if (_is_compiling() or _is_tracing() or _forward_ad._current_level >= 0 or not isinstance(x, torch.Tensor)
            or in_functorch_transform() or _dispatch_modes_active() != 0
            or type(x).__torch_dispatch__ is not _PLAIN_DISPATCH):
        return None
    try:
        shape = x.shape  # nested tensors raise here
        rank = len(shape)
        if not shape or type(dim) is not int or not -rank <= dim < rank:  # bool, np.int64: later
            return None
        last = dim in (-1, rank - 1)
        dim %= rank
        n = shape[dim]
        constants = kernel_constants(n, x.dtype)
        if constants is None or not x.is_cpu or x.is_neg():
            return None
        if x.requires_grad and _is_grad_enabled():
            return None
        contiguous = x.is_contiguous()  # sparse CSR raises
        if contiguous and last:
            rows, interleave = math.prod(shape[:-1]), 1
        else:
            layout = _interleaved_layout(shape, x.stride(), dim, x.element_size(), contiguous)
            if layout is None:
                return None
            rows, interleave = layout
        address = x.data_ptr()  # tensors without storage raise: sparse COO, legacy-vmap batched, functionalized
    except RuntimeError:  # the general path says what is wrong, or routes the tensor where it can go
        return None
    if rows == 0 or address % (8 if constants.float64 else 4) != 0:  # torch.frombuffer can misalign
        return None
    return rows, n, interleave, constants, address


def fwht(
    x: torch.Tensor,
    dim: int | tuple[int, ...] | list[int] = -1,
    normalized: bool = True,
    inplace: bool = False,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fast Walsh-Hadamard transform of ``x`` along ``dim``.

    Computes ``y = c · H x`` along ``dim``, with ``H = H_m ⊗ H_{2^k}`` for a length ``n = m · 2^k``
    (``m`` in 1, 12, 20, 28; ``H_{2^k}`` in Sylvester natural order, equal to ``scipy.linalg.hadamard``)
    and ``c = 1/sqrt(n)`` when ``normalized`` (then ``H`` is orthonormal and ``fwht(fwht(x)) == x``),
    else ``c = 1``. Cost ``O(n log n)`` per row (plus ``O(m n)`` for the ``H_m`` factor).

    Args:
        x: real floating tensor of any shape ``(..., n, ...)``. float32/float64 are computed in their own
            dtype; float16/bfloat16 in float32 and cast back. Non-contiguous input is fine.
        dim: the dimension to transform. On CPU, a dimension other than the last of a tensor whose elements
            fill their memory (contiguous, a transpose, ``channels_last``) is transformed where it lies when
            its stride is a whole number of 64-byte cache lines (16 float32, 8 float64 values): in 1.2-2.3x
            the time of the same bytes along the last dimension (``benchmarks/fwht.py``, a Xeon); otherwise,
            and for other layouts, through a contiguous copy. A tuple or list of distinct dimensions, as
            ``torch.fft.fftn`` takes, transforms along each in turn (the transforms commute): the
            multidimensional transform ``H ⊗ H ⊗ ...``, e.g. ``dim=(-2, -1)`` for a 2-D Walsh-Hadamard
            transform of images. Every dimension is checked before any is transformed; ``()`` transforms
            none (a copy, or ``x`` itself in place).
        normalized: scale by ``1/sqrt(n)`` (for several dimensions, by ``1/sqrt(n)`` of each: orthonormal).
        inplace: write the result into ``x`` and return ``x`` (no autograd through it).
        out: write the result into this tensor and return it, as torch's ``out=`` arguments do (refused in grad
            mode where ``x`` or ``out`` requires grad; a forward-mode tangent of ``x`` is carried into ``out``);
            ``x`` is left as it was. It must have ``x``'s shape, dtype and device, and may be ``x`` itself but
            must not otherwise share memory with it. A big transform repeated in a loop then reuses one result
            instead of allocating a fresh one each call, whose pages the OS must fault in and zero (a
            2^24-point float32 row, 1 thread, a Xeon: 20.0-21.6 ms into a fresh result, 13.3-14.1 into
            ``out``, 9.5-10.0 in place). Where ``out`` has ``x``'s strides and ``x`` goes straight to the
            kernel, the kernel reads ``x`` and writes ``out`` in one go; otherwise ``x`` is copied into ``out``
            and transformed there (or, where ``out`` may share some of ``x``'s memory, transformed apart and
            copied in).

    Returns:
        a tensor of ``x``'s shape and dtype (and, where it was transformed where it lies, of ``x``'s strides).
        Differentiable: the backward pass is the same transform.

    Rounding: for a given input, thread count and CPU the result is always the same, but a row's last bits
    may change with the number of threads, with the size of the whole call (calls of 16 MB and more
    order the stages differently on AVX-512 CPUs, in place and out of place differently again), and with
    whether the transformed dimension is read where it lies or through a contiguous copy; the error
    stays within the accuracy rule of the tests (the largest error at most twice ``fwht_reference``'s, over
    batches of rows). The kernel orders its stages differently from ``fwht_reference``, so the two round
    differently: on a single row of 16 to 64 float32 values, the largest error came out above twice the
    reference's for 0.5-4 % of random inputs, and the reference's above twice the kernel's about as often
    (AVX2, 200 seeds each); on a row of 256 values, for none; on batches of zero-mean values, rarely (a review
    found 1 float32 batch of 64 rows of 128 in 400 seeds at 2.19x the reference's error, on AVX-512). On values
    with a non-zero mean the largest error is that of the one sum the mean dominates, a single rounding in each
    order, so the rule holds only on average: uniform [0, 1) or 1000 + N(0, 1) float32 values broke it in
    5-12 % of calls on one or two rows of 4096 to 28672 values, up to 3.9x, and the reference's error was above
    twice the kernel's about as often (a review on Zen 3, 150-200 seeds per length). Normalized, the sums are
    scaled after the last stage, as ``fwht_reference`` does: subnormal inputs lose no bits (their sums are
    exact), and a row whose unscaled sums pass the largest float (``|x|`` above about ``finfo.max / n``)
    overflows, as in the reference.

    Raises:
        TypeError: integer, bool or complex ``x``; a ``dim`` (or an entry of a tuple of dims) that is not an int.
        ValueError: ``dim`` out of range, or a length that is not ``m · 2^k`` (see ``pad_to_hadamard``); a
            tuple of dims naming one dimension twice.
        RuntimeError: ``inplace`` on a tensor that requires grad (in grad mode), or whose elements share
            memory (an expanded or ``unfold`` view), as torch's in-place ops refuse them; ``out`` where ``x``
            or ``out`` requires grad (in grad mode), or whose elements share memory.
        TypeError, ValueError (``out``): not a tensor, another dtype (TypeError), another shape or device, memory
            shared with ``x`` other than being ``x`` where both fill their byte ranges, or given with
            ``inplace=True`` (ValueError). Where their ranges meet but one has gaps (``s[:, :8]`` and
            ``s[:, 4:12]``), which the strides do not settle cheaply, the result is computed apart and then
            copied into ``out``: every element of ``x`` is read before any of ``out`` is written.

    Empty tensors give empty results; the transformed dimension's length is checked all the same (zero rows
    of 10 values are refused, as one row would be), except a length of 0. Under ``torch.compile`` and
    ``torch.export`` that length is specialised (it picks ``m`` and the kernel: each length traces its own
    graph, and torch refuses a dynamic ``Dim`` on it); every other dimension may be dynamic.
    """
    if type(normalized) is not bool or type(inplace) is not bool:
        _refuse_flags(normalized=normalized, inplace=inplace)
    if out is not None:
        return _fwht_out(x, dim, normalized, inplace, out)
    direct = _direct_kernel_args(x, dim)
    if direct is not None:  # the common case, with as little Python as possible before the kernel
        rows, n, interleave, constants, address = direct
        if inplace:
            if x.is_inference():
                _check_inference_update(x)
            _run_kernel(address, address, rows, n, constants, normalized, interleave)
            _increment_versions((x,))  # as any in-place op: autograd then refuses x if it was saved for backward
            return x
        out = _empty_result(x)
        _run_kernel(address, out.data_ptr(), rows, n, constants, normalized, interleave)
        return out
    if _is_dim_sequence(dim):
        return _fwht_dims(x, _checked_dims(x, dim, "fwht"), normalized, inplace)
    dim = _as_dim(dim, "an int or a tuple of ints")
    n = _check_input(x, dim)
    if x.numel() == 0 or n == 0:
        if inplace:  # refused as a non-empty tensor would be (a leaf that requires grad, an inference tensor)
            _check_inplace_target(x)
        return x if inplace else x.clone()
    if x.dim() == 0:  # a vector of length 1
        out = fwht(x.unsqueeze(0), -1, normalized, inplace)
        return x if inplace else out.squeeze(0)
    moved = x if dim in (-1, x.dim() - 1) else x.movedim(dim, -1)
    if inplace:
        _check_inplace_target(x)
        if (x.dtype in _LOW_PRECISION or in_functorch_transform() or _forward_ad._current_level >= 0
                or (not _is_compiling() and (moved.is_neg() or _is_legacy_batched(moved)))):
            # Computed out of place, then written through the view: copy_ applies the lazy negation, works on
            # torch.func's wrapper tensors and carries a forward-mode tangent. (The result is cast first:
            # torch 2.13's float32 -> float16 copy_ into a negated view drops the negation.)
            result = _low_precision_result(moved, normalized)
            moved.copy_(result.to(x.dtype) if _is_compiling() or moved.is_neg() else result)  # no is_neg to trace
        elif runs_native_eager(moved) and _kernel_can_take(moved):
            fwht_into(moved, moved, normalized)
            _increment_versions((moved,))
        else:
            _fwht_inplace_op(moved, normalized)
        return x
    if x.dtype in _LOW_PRECISION:
        out = _low_precision_result(moved, normalized).to(x.dtype)
    else:
        out = _last_dim(moved.to(_compute_dtype(x.dtype)), normalized).to(x.dtype)
    return out if moved is x else out.movedim(-1, dim)  # no view (and no autograd node) for nothing


def _fwht_out(x: torch.Tensor, dim: object, normalized: bool, inplace: bool, out: torch.Tensor) -> torch.Tensor:
    """``fwht(x, dim, normalized, out=out)``: everything is checked before ``out`` is written."""
    if inplace:
        raise ValueError("fwht: pass inplace=True or out=, not both (out=x is the in-place transform)")
    if _is_compiling():  # traced: the result into out (memory and its sharing are not known while tracing)
        _check_out(x, out)
        return out.copy_(fwht(x, dim, normalized))
    if _is_dim_sequence(dim):
        _checked_dims(x, dim, "fwht")
    else:
        _check_input(x, _as_dim(dim, "an int or a tuple of ints"))
    _check_out(x, out)
    relation = _memory_relation(x, out)
    if relation == "overlap":
        raise ValueError("fwht: out shares memory with x without being x (the same memory and strides)")
    if relation == "maybe":  # computed apart first, so that no element of x is overwritten before it is read
        _check_inplace_target(out, _OUT_TARGET, _OUT_REMEDY)
        return out.copy_(fwht(x, dim, normalized))
    direct = _direct_kernel_args(x, dim)
    if direct is not None and _kernel_can_write(out, x.stride()):
        rows, n, interleave, constants, address = direct
        if out.is_inference():
            _check_inference_update(out, _OUT_TARGET)
        _run_kernel(address, out.data_ptr(), rows, n, constants, normalized, interleave)
        _increment_versions((out,))
        return out
    _check_inplace_target(out, _OUT_TARGET, _OUT_REMEDY)
    if relation != "same":
        out.copy_(x)  # nothing requires grad here (refused above) or grad mode is off
    return fwht(out, dim, normalized, inplace=True)


def _check_out(x: torch.Tensor, out: object) -> None:
    """Refuse an ``out`` that is not a dense tensor of ``x``'s dtype, shape and device, or a call that would have
    to record a gradient through it (as torch's functions with ``out=`` arguments refuse one)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"fwht: out must be a torch.Tensor, got {type(out).__name__}")
    if out.layout != torch.strided or out.is_nested:
        layout = "nested" if out.is_nested else str(out.layout)
        raise TypeError(f"fwht: out must be a dense (strided) tensor, got a {layout} one")
    if out.dtype != x.dtype:
        raise TypeError(f"fwht: out has dtype {out.dtype}, expected x's dtype {x.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"fwht: out has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"fwht: out is on {out.device}, expected x's device {x.device}")
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        raise RuntimeError(
            "fwht(out=...) cannot be differentiated: x or out requires grad. "
            "Call fwht(x) without out, or run under torch.no_grad()."
        )


def _memory_relation(x: torch.Tensor, out: torch.Tensor) -> str:
    """How ``out``'s memory relates to ``x``'s: ``"same"`` (the same memory with the same strides), ``"apart"``
    (byte ranges that do not meet), ``"overlap"`` (ranges that meet, and both tensors fill
    theirs: some element is in both), or ``"maybe"`` (ranges that meet where one has gaps, such as ``s[:, ::2]``
    and ``s[:, 1::2]``: too costly to settle, as torch finds it). Tensors without memory of their own (meta,
    tracing, torch.func wrappers) and empty ones count as apart. Byte ranges are compared whatever the
    storages: two ``torch.from_numpy`` views of overlapping parts of one array have storages of their own
    (counted apart, such an ``out`` was written while ``x`` was read: a wrong result)."""
    if out is x:
        return "same"
    if x.device.type == "meta" or x.numel() == 0 or not (_dispatches_plainly(x) and _dispatches_plainly(out)):
        return "apart"
    try:
        if x.data_ptr() == out.data_ptr() and x.stride() == out.stride():
            # a lazily negated view of out's memory (complex.conj().imag) is not x itself: computed apart
            return "same" if x.is_neg() == out.is_neg() else "maybe"
        x_span, out_span = _span_bytes(x), _span_bytes(out)
        if not (x.data_ptr() < out.data_ptr() + out_span and out.data_ptr() < x.data_ptr() + x_span):
            return "apart"
    except RuntimeError:  # a tensor without storage
        return "apart"
    fills = (x.nbytes == x_span and out.nbytes == out_span and _overlap_from_strides(x) is False
             and _overlap_from_strides(out) is False)
    return "overlap" if fills else "maybe"


def _span_bytes(x: torch.Tensor) -> int:
    """Bytes from ``x``'s first element to the end of its last (torch's strides are never negative)."""
    return x.element_size() * (1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())))


def _kernel_can_write(out: torch.Tensor, strides: tuple[int, ...]) -> bool:
    """Whether the kernel may write straight into ``out``: a plain CPU tensor with the given strides (those of the
    input it reads), aligned, without a lazy negation bit."""
    try:
        return (out.is_cpu and out.stride() == strides and not out.is_neg() and _dispatches_plainly(out)
                and out.data_ptr() % out.element_size() == 0)
    except RuntimeError:
        return False


# How the checks of an out= call name its target, and what they suggest instead.
_OUT_TARGET = "fwht(out=...): out"
_OUT_REMEDY = "Pass an out whose elements each have memory of their own."


def _check_inplace_target(
    x: torch.Tensor, name: str = "fwht(inplace=True): x", remedy: str = "Use inplace=False, or clone x first."
) -> None:
    """Refuse (RuntimeError) an in-place transform of ``x`` that autograd cannot take or whose result cannot be
    written into it, as torch's in-place ops refuse them (and an inference tensor outside inference mode).
    ``name`` and ``remedy`` word the messages (``fwht(out=...)`` checks its ``out`` here too)."""
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(  # torch's error type for in-place updates autograd cannot take
            "fwht(inplace=True) cannot be differentiated: x requires grad. "
            "Use inplace=False, or run under torch.no_grad()."
        )
    # Under torch.compile the check sees the traced strides, but cannot build a table of offsets: a layout
    # the strides do not settle is refused there (it used to be written silently, wrong, where rows overlap).
    if _is_compiling():
        shares_memory = not in_functorch_transform() and _overlap_from_strides(x) is not False
    else:
        if x.is_inference():
            _check_inference_update(x, name)
        shares_memory = not in_functorch_transform() and _dispatches_plainly(x) and _overlaps_itself(x)
    if shares_memory:
        raise RuntimeError(
            f"{name} has elements that share memory (an expanded, unfold or as_strided view), "
            "or, under torch.compile, a layout whose strides do not show it has none, so its result cannot "
            f"be written into it. {remedy}"
        )


def _fwht_dims(x: torch.Tensor, dims: list[int], normalized: bool, inplace: bool) -> torch.Tensor:
    """``fwht`` along each of the checked, distinct ``dims`` in turn. Out of place, the first transform makes the
    result and the others run in place on it where nothing records ops (the direct kernel path). float16 and
    bfloat16 go through all the dims in float32 and are rounded once, as for one dim."""
    if not dims:
        if inplace:  # refused as any in-place op is, though nothing is written
            _check_inplace_target(x)
            return x
        return x.clone()
    if x.dtype in _LOW_PRECISION:
        if inplace:
            _check_inplace_target(x)
        result = _low_precision_result(x, normalized, dims).to(x.dtype)
        return x.copy_(result) if inplace else result
    out = fwht(x, dims[0], normalized, inplace)
    for d in dims[1:]:
        direct = None if inplace else _direct_kernel_args(out, d)
        if direct is None:
            out = fwht(out, d, normalized, inplace)
        else:  # the fresh result, which nothing else has seen: in place, where it lies
            rows, n, interleave, constants, address = direct
            _run_kernel(address, address, rows, n, constants, normalized, interleave)
    return out


def _low_precision_result(moved: torch.Tensor, normalized: bool, dims: list[int] | None = None) -> torch.Tensor:
    """The transform of ``moved`` along its last dimension (or along each of the checked ``dims``) in float32
    (``moved``'s own dtype where it is float32 or float64): the float32 copy that the computation needs anyway is
    transformed in place where nothing records ops (float16 (4096, 1024) on a Xeon, 1 thread: out of place 1.19x
    faster than through a second float32 tensor, in place 1.39x with the copy back uncast), out of place
    otherwise (a gradient to record included)."""
    work = moved.to(_compute_dtype(moved.dtype))
    in_place = not (work is moved or _is_compiling() or in_functorch_transform() or _forward_ad._current_level >= 0
                    or (work.requires_grad and torch.is_grad_enabled()) or not _dispatches_plainly(work))
    if dims is None:
        return fwht(work, normalized=normalized, inplace=in_place)
    return _fwht_dims(work, dims, normalized, in_place)


def _check_inference_update(x: torch.Tensor, name: str = "fwht(inplace=True): x") -> None:
    """Raise as torch does for an in-place update of an inference tensor outside inference mode (the kernel
    writes memory directly, past the dispatcher's check)."""
    if not torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{name} is an inference tensor (made under torch.inference_mode()); in-place "
            "updates to it are only allowed inside inference mode. Use inplace=False or clone it first."
        )


def pad_to_hadamard(x: torch.Tensor, dim: int = -1, powers_of_two_only: bool = False) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` to the next length ``fwht`` supports.

    With ``powers_of_two_only`` the target is the next power of two (what most other FWHT libraries need).
    Returns ``x`` itself when no padding is needed.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if type(powers_of_two_only) is not bool:
        _refuse_flags(powers_of_two_only=powers_of_two_only)
    dim = _as_dim(dim)
    if x.dim() == 0:  # a vector of length 1, as fwht treats it: nothing to pad
        if dim not in (0, -1):
            raise ValueError(f"dim={dim} is out of range for a 0-d tensor (expected 0 or -1)")
        return x
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {x.dim()} dimensions")
    n = int(x.shape[dim])
    if n == 0:  # fwht takes an empty dimension as it is
        return x
    if powers_of_two_only:
        target = 1 << (n - 1).bit_length()
        target = target if target <= 1 << MAX_POW2_LOG2 else None
    else:
        _, target = nearest_hadamard_lengths(n)
    if target is None:
        longest = f"power of two (2^{MAX_POW2_LOG2})" if powers_of_two_only else "supported length"
        raise ValueError(f"dimension {dim} has length {n}, longer than the longest {longest}")
    if target == n:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = target - n
    return torch.cat((x, x.new_zeros(pad_shape)), dim=dim)
