"""Spectral linear layers: diagonal scalings around the Walsh-Hadamard transform.

One block maps ``x`` (length ``in_features``) to

    y = s_out ⊙ H P (s_in ⊙ pad(x)) + b

with ``H`` the orthonormal Walsh-Hadamard transform of length ``L`` (``dreidel.fwht``), ``P`` a fixed random
permutation, and ``s_in``, ``s_out``, ``b`` trainable vectors. This is the ACDC / Fastfood family:
Moczulski et al. 2016, "ACDC: A Structured Efficient Linear Layer" (arXiv:1511.05946) cascade
diagonal-transform-diagonal factors with permutations in between; Yang et al. 2015, "Deep Fried Convnets"
(arXiv:1412.7149) use the Fastfood transform (Le et al. 2013) ``S H G Π H B`` as a trainable layer and stack
independent Fastfood blocks to reach outputs wider than the transform.

Widths:
- ``L`` is the smallest supported Hadamard length ``>= in_features`` (``m·2^k``, ``m`` in 1, 12, 20, 28), so
  384 = 12·32 or 640 = 20·32 need no padding; other widths are zero-padded up to ``L``.
- When ``out_features > L``, ``ceil(out_features / L)`` independent blocks (each with its own ``s_in``,
  ``P`` and ``s_out``) are stacked and the output is truncated to ``out_features``; when
  ``out_features < L`` the one block's output is truncated.

``DeepSpectralLinear`` cascades ``depth`` transforms, each preceded by its own permutation and diagonal:
``y = s_out ⊙ H P_K (s_{K-1} ⊙ H P_{K-1} (… s_1 ⊙ H P_1 (s_in ⊙ pad(x)))) + b``; ``depth=1`` is ``LinearWHT``.

Initialisation (``init=``), both variance preserving. For inputs with independent features of common
variance σ² (bias zero), output ``j`` has variance ``σ² ‖W_j‖²``, ``W_j`` row ``j`` of the layer's matrix
(``dense_matrix``). At ``depth=1`` that is σ² for every output and every draw. At ``depth > 1`` it is σ² only
on average over the random draws (permutations and inner scales): within one layer single outputs get more or
less (at 13 inputs, 40 outputs and depth 4, from about 0.1 σ² to several σ²), and with ``"random_sign"`` at
small widths some outputs can be identically zero.
- ``"variance_preserving"`` (default): each diagonal before a transform is drawn i.i.d. N(0, 1) and rescaled
  per block to unit mean square (Fastfood's Gaussian ``G``). With the orthonormal ``H``,
  ``Var(y_j) = s_out_j² · (1/L) · Σ_i s_in_i² σ² = s_out_j² · (n/L) · σ²`` (only the ``n = in_features``
  unpadded entries carry signal; truncation removes outputs, not variance), hence ``s_out = sqrt(L / n)``.
  Each inner stage ``z ↦ H P (s ⊙ z)`` keeps the per-entry variance on average over its random ``P`` and ``s``
  (unit mean square), not for each draw: it mixes entries of the previous stage, which are not independent.
- ``"random_sign"``: each diagonal before a transform is ±1 at random (Rademacher), ``s_out = sqrt(L / n)``.
  Then ``E_s[y_j²] = (1/n) Σ_i E[x_i²]`` for any input covariance, not only independent features.

Lazy width: ``LinearWHT(1024)`` (one width) means ``out_features=1024`` with ``in_features`` inferred from
the last dimension of the first input, like ``nn.LazyLinear``. Until then the parameters are
``UninitializedParameter``s: run one forward pass (a dry run) before building the optimizer, or load a
state dict, which materialises them with the stored shapes.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from dreidel._checks import check_generator
from dreidel._native import native
from dreidel._system import usable_memory_bytes
from dreidel.algo import nearest_hadamard_lengths
from dreidel.algo._fwht import _dispatches_plainly, _refuse_flags, in_functorch_transform
from dreidel.layers._activation import resolve_activation
from dreidel.layers._spectral_grads import (
    SpectralLayout,
    spectral_linear,
    spectral_per_sample_grads,
    spectral_stages,
)

__all__ = ["DeepSpectralLinear", "LinearWHT", "SPECTRAL_INITS", "transform_length"]

_is_compiling = torch.compiler.is_compiling  # bound once: layout() runs on every forward
_is_autocast_enabled = torch.is_autocast_enabled

SPECTRAL_INITS = ("variance_preserving", "random_sign")


def _same_values(current: torch.Tensor, built_from: torch.Tensor) -> bool:
    """Whether the permutation still holds the values its indices were built from (``built_from``: a copy).

    Off the CPU it is taken as unchanged: comparing there would wait for the device on every forward.
    """
    if current.shape != built_from.shape or current.dtype != built_from.dtype:
        return False
    if not current.is_cpu:  # meta (shapes only), or a device
        return True
    if current.is_contiguous() and built_from.is_contiguous():  # the same element order in memory
        return native.bytes_equal(current.data_ptr(), built_from.data_ptr(), current.nbytes)
    return torch.equal(current, built_from)


class _IndexSource(NamedTuple):
    """What a layer's derived indices were built from (see ``_SpectralLinearBase.layout``)."""

    permutation: torch.Tensor  # the permutation tensor itself (after .to(), the moved one)
    version: int | None  # its version counter then (inference tensors have none)
    flat_perm: torch.Tensor  # our _flat_perm index, built from it
    values: torch.Tensor | None  # a copy of its values; None where the indices are stale (after .to())
    replaced: torch.Tensor | None  # the _flat_perm this build replaced


# Peak bytes per element of a layer's (depth, blocks, length) permutation while it is drawn and its indices built
# (the permutation, a copy of its values, the derived index buffers and their temporaries): measured 65-66 for
# LinearWHT of 2^22 and 2^24 features, 51 for DeepSpectralLinear of 2^22 at depth 3.
_BUILD_BYTES_PER_INDEX = 66


def _plain(permutation: torch.Tensor) -> bool:
    """Whether ``permutation`` is a plain tensor outside anything that traces or rewrites ops (make_fx, a fake or
    another dispatch mode, torch.func): data-dependent checks and indices kept as buffers are only for it."""
    return not in_functorch_transform() and _dispatches_plainly(permutation)


def _checkable(permutation: torch.Tensor) -> bool:
    """Whether ``permutation``'s values can be read: a tensor no torch.func transform has wrapped (a buffer read
    inside ``vmap`` or ``grad`` is one), outside a dispatch mode."""
    return not torch._C._functorch.is_functorch_wrapped_tensor(permutation) and _dispatches_plainly(permutation)


class _UninitializedIndexBuffer(UninitializedBuffer):
    """A lazy layer's ``permutation`` before its width is known. torch's ``UninitializedBuffer`` cannot be
    deep-copied and comes back from pickle as float32 (``UninitializedParameter`` has both right); this
    keeps its device and dtype through both, so a lazy layer can be copied before its first forward."""

    def __deepcopy__(self, memo: dict) -> "_UninitializedIndexBuffer":
        if id(self) not in memo:
            memo[id(self)] = type(self)(device=self.data.device, dtype=self.data.dtype)
        return memo[id(self)]

    def __reduce_ex__(self, protocol: object) -> tuple:
        return type(self), (False, self.data.device, self.data.dtype)


def transform_length(in_features: int) -> int:
    """The Hadamard length a spectral layer uses for ``in_features`` inputs: the smallest supported ``>= it``.

    Raises:
        TypeError: ``in_features`` is not an integer (any integer type is taken; bools are refused).
        ValueError: ``in_features < 1``, or longer than the longest supported Hadamard length.
    """
    return _cached_transform_length(_as_width("in_features", in_features, allow_none=False))


@functools.lru_cache(maxsize=None)  # behind the check: the cache takes True for 1 and 2.0 for 2
def _cached_transform_length(in_features: int) -> int:
    length = nearest_hadamard_lengths(in_features)[1]
    if length is None:
        raise ValueError(f"in_features={in_features} exceeds the longest supported Hadamard length")
    return length


def _as_width(name: str, value: object, allow_none: bool) -> int | None:
    """``value`` as a Python int >= 1 (any integer type, as ``nn.Linear`` takes NumPy's), or None if allowed."""
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        width = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}") from None
    if width < 1:
        raise ValueError(f"{name} must be a positive int, got {width}")
    return width


def check_dense_input(layer: nn.Module, x: object, name: str = "input") -> None:
    """``TypeError`` naming ``layer`` and ``name`` unless ``x`` is a dense (strided) tensor: sparse, mkldnn and
    nested tensors failed inside the gathers with torch's internal messages."""
    where = f"{type(layer).__name__}: {name}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{where} is a nested tensor; apply the layer to each of its tensors (x.unbind()), or pad "
                        "them into one dense tensor (x.to_padded_tensor(0.0))")
    if x.layout != torch.strided:
        raise TypeError(f"{where} must be a dense (strided) tensor, got layout {x.layout}; convert it with "
                        "x.to_dense()")


def check_input_dtype_and_device(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Refuse, as ``nn.Linear`` does, an input whose dtype or device is not that of ``layer``'s ``weight``.

    No silent promotion (a float64 input would give a float64 output) and no integer input; under autocast a
    floating input of another dtype is left to autocast, except float64, which autocast does not cast.
    """
    if x.dtype != weight.dtype and not _autocast_applies(x):
        raise TypeError(
            f"{type(layer).__name__}: input dtype {x.dtype} does not match the layer's {weight.dtype} "
            f"parameters; convert one of them (x.to({weight.dtype}) or layer.to(...))"
        )
    if x.device != weight.device:
        raise ValueError(f"{type(layer).__name__}: input on {x.device}, the layer's parameters on {weight.device}")


def _autocast_applies(x: torch.Tensor) -> bool:
    """Whether autocast is on for ``x``'s device and casts ``x`` (floating, not float64, as torch's rule is)."""
    if not x.is_floating_point() or x.dtype == torch.float64:
        return False
    try:
        return _is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


_INDEX_NAMES = ("_input_gather", "_scale_gather", "_flat_perm", "_flat_inverse", "_input_scatter")  # SpectralLayout's


def _indices_from(perm: torch.Tensor, n: int, length: int) -> tuple[torch.Tensor, ...]:
    """The flat int32 indices of ``SpectralLayout`` (``_INDEX_NAMES`` order) for ``perm`` ``(depth, B, L)`` and
    ``n`` inputs: plain torch ops, so that ``torch.compile`` can derive them inside its graph."""
    depth, blocks = perm.shape[0], perm.shape[1]
    offsets = torch.arange(blocks, device=perm.device).view(1, blocks, 1) * length
    flat_perm = (perm + offsets).reshape(depth, blocks * length)  # a permutation put in place may be strided
    # Out of place: functorch has a batching rule for scatter, not for scatter_ (vmap under torch.compile warned)
    flat_inverse = torch.zeros_like(flat_perm).scatter(
        1, flat_perm, torch.arange(blocks * length, device=perm.device).expand_as(flat_perm))
    first = perm[0]  # (B, L): source position in the padded input of each block
    padded = first >= n
    # Stage 1 reads x with one zero column appended where n < L: padded positions read that zero (reading a value
    # of x there and zeroing it by the zero scale gave NaN for an infinite value: 0 * inf).
    input_gather = torch.where(padded, torch.full_like(first, n), first).reshape(-1)
    if n == length:  # nothing padded: index s_in (B, L) directly
        scale_gather = flat_perm[0]
    else:  # index pad(s_in, one zero slot per block) (B, n + 1): padded entries read the zero
        block_rows = torch.arange(blocks, device=perm.device).view(blocks, 1) * (n + 1)
        scale_gather = (torch.where(padded, torch.full_like(first, n), first) + block_rows).reshape(-1)
    input_scatter = flat_inverse[0].view(blocks, length)[:, :n].reshape(-1)
    # int32 halves the index memory (index_select takes int32 or int64 indices)
    return tuple(t.to(torch.int32).contiguous() for t in (input_gather, scale_gather, flat_perm, flat_inverse,
                                                            input_scatter))


_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_permutation(perm: torch.Tensor, shape: tuple[int, ...]) -> None:
    """``ValueError`` naming ``permutation`` unless it is an integer tensor of ``shape`` ``(depth, B, L)`` with
    values in ``[0, L)``: one put in place of the layer's (``functional_call``, a replaced buffer, ``.data``)
    would otherwise fail inside ``scatter_`` or ``view`` with torch's message. (A repeated index is refused by
    the kernels' checks, and here too.)"""
    if tuple(perm.shape) != tuple(shape) or perm.dtype not in _INDEX_DTYPES:
        raise ValueError(f"permutation: expected an integer tensor of shape {tuple(shape)} (depth, blocks, "
                         f"transform length), got {perm.dtype} of shape {tuple(perm.shape)}")
    if perm.numel() and not perm.is_meta and (int(perm.min()) < 0 or int(perm.max()) >= shape[-1]):
        raise ValueError(f"permutation: values must lie in [0, {shape[-1]}) (a permutation of each block's "
                         f"transform), got values from {int(perm.min())} to {int(perm.max())}")
    if perm.numel() and not perm.is_meta:  # a repeated index (the native kernels refuse one; the torch path did not)
        hits = torch.zeros(shape, dtype=torch.int32, device=perm.device)  # O(n): how often each index appears
        hits.scatter_add_(-1, perm.long(), torch.ones_like(hits))
        if not bool((hits == 1).all()):
            raise ValueError("permutation: each (stage, block) row must be a permutation of "
                             f"0..{shape[-1] - 1}; some row repeats an index (was the buffer overwritten? "
                             "torch.optim.swa_utils.AveragedModel(use_buffers=True) with an EMA averages integer "
                             "buffers in floating point and truncates them: use use_buffers=False, which keeps "
                             "the permutation, as training never changes it)")


class _SpectralLinearBase(LazyModuleMixin, nn.Module):
    """Shared machinery of ``LinearWHT`` (depth 1) and ``DeepSpectralLinear`` (depth K).

    Parameters (``B`` stacked blocks, transform length ``L``, ``n = in_features``):
        in_scale: ``(B, n)``; inner_scale: ``(depth - 1, B, L)`` (only when ``depth > 1``);
        out_scale: ``(out_features,)``; bias: ``(out_features,)`` or None.
    Buffers: ``permutation`` ``(depth, B, L)`` int64, ``permutation[k, b]`` the permutation of stage ``k`` in
    block ``b`` (``P(v)_j = v[permutation[k, b, j]]``); persistent, so a reloaded layer is bit-identical.
    """

    cls_to_become = None

    def __init__(
        self,
        in_features: int | None,
        out_features: int | None,
        *,
        depth: int,
        bias: bool,
        activation: str | None,
        init: str,
        generator: torch.Generator | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        if out_features is None:  # Keras-like: one width is the output width; the input width is lazy.
            in_features, out_features = None, in_features
        in_features = _as_width("in_features", in_features, allow_none=True)
        out_features = _as_width("out_features", out_features, allow_none=False)
        depth = _as_width("depth", depth, allow_none=False)
        if type(bias) is not bool:
            _refuse_flags(bias=bias)  # a truthy "no" would add a bias
        if init not in SPECTRAL_INITS:
            raise ValueError(f"init must be one of {SPECTRAL_INITS}, got {init!r}")
        check_generator("generator", generator)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a real floating torch.dtype or None, got {dtype!r}")
        self._activation_fn = resolve_activation(activation)
        self.activation = activation
        self.in_features = in_features
        self._transform_length = self._num_blocks = 0
        self.out_features = out_features
        self.depth = depth
        self.init = init
        self._generator = generator
        factory = {"device": device, "dtype": dtype}
        self.in_scale = UninitializedParameter(**factory)
        self.register_parameter("inner_scale", UninitializedParameter(**factory) if depth > 1 else None)
        self.out_scale = UninitializedParameter(**factory)
        self.register_parameter("bias", UninitializedParameter(**factory) if bias else None)
        self.register_buffer("permutation", _UninitializedIndexBuffer(device=device, dtype=torch.long))
        self.register_load_state_dict_post_hook(_after_load)
        if in_features is not None:
            self._materialize(in_features)

    # ----------------------------------------------------------------------------------------- shapes
    @property
    def transform_length(self) -> int:
        """``L``, the Hadamard length of each block (needs ``in_features``)."""
        self._require_in_features()
        return self._transform_length

    @property
    def num_blocks(self) -> int:
        """``B = ceil(out_features / L)``, the number of stacked independent blocks."""
        self._require_in_features()
        return self._num_blocks

    def _set_in_features(self, in_features: int) -> None:
        self.in_features = in_features
        self._transform_length = transform_length(in_features)  # plain ints: no work per forward call
        self._num_blocks = math.ceil(self.out_features / self._transform_length)

    def _check_fits_in_memory(self, in_features: int) -> None:
        """Refuse (MemoryError) a width whose index buffers would not fit, while they are built, in the memory this
        process may use (the machine's, or its cgroup's limit where lower), before anything is allocated: the
        process was killed for lack of memory instead, after minutes (``LinearWHT(2**31, 3)``: about 23 GB
        allocated when it was)."""
        if self.permutation.is_meta:  # shapes only: nothing is allocated
            return
        length = transform_length(in_features)
        elements = self.depth * math.ceil(self.out_features / length) * length
        need, have = _BUILD_BYTES_PER_INDEX * elements, usable_memory_bytes()
        if have is not None and need > have:
            raise MemoryError(
                f"{type(self).__name__}(in_features={in_features}, out_features={self.out_features}, "
                f"depth={self.depth}) needs about {need / 2**30:.1f} GiB while it builds its permutation and index "
                f"buffers ({elements} indices), more than the {have / 2**30:.1f} GiB of memory this process may use"
            )

    def _require_in_features(self) -> int:
        if self.in_features is None:
            raise RuntimeError(
                f"{type(self).__name__} has lazy in_features: run a forward pass (or load a state dict) first"
            )
        return self.in_features

    def _expected_shapes(self, in_features: int) -> dict[str, tuple[int, ...]]:
        length = transform_length(in_features)
        blocks = math.ceil(self.out_features / length)
        shapes = {"in_scale": (blocks, in_features), "out_scale": (self.out_features,),
                  "permutation": (self.depth, blocks, length)}
        if self.depth > 1:
            shapes["inner_scale"] = (self.depth - 1, blocks, length)
        if self.bias is not None:
            shapes["bias"] = (self.out_features,)
        return shapes

    # ------------------------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Checks this layer's tensors in ``state_dict`` before anything is loaded (or a lazy layer materialised):
        a refused state dict leaves the layer as it was, and ``load_state_dict`` raises the ``RuntimeError`` it
        raises for any module's bad entries (naming them with their prefix, as ``nn.Linear``'s size mismatches
        are), with ``strict=False`` too; ``_after_load`` then rebuilds the indices."""
        error = self._state_dict_error(state_dict, prefix)
        if error is not None:
            error_msgs.append(error)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _state_dict_error(self, state_dict, prefix: str) -> str | None:
        """Why this layer's entries in ``state_dict`` cannot be loaded, or ``None``."""
        name = type(self).__name__
        keys = ("in_scale", "inner_scale", "out_scale", "bias", "permutation")
        given = {key: state_dict[prefix + key] for key in keys
                 if prefix + key in state_dict and getattr(self, key) is not None}
        if any(nn.parameter.is_lazy(value) for value in given.values()):
            return None  # the state of a layer that has not seen data yet: LazyModuleMixin loads it as such
        if not given:
            return None
        for key, value in given.items():
            if not isinstance(value, torch.Tensor):
                return f"{name}: state dict entry {prefix + key!r} must be a tensor, got {type(value).__name__}"
        lazy = self.in_features is None
        if lazy:
            in_scale = given.get("in_scale")
            if in_scale is None or in_scale.dim() != 2:
                got = "none" if in_scale is None else f"shape {tuple(in_scale.shape)}"
                return (f"{name}: a lazy layer learns its width from the state dict's {prefix + 'in_scale'!r} of "
                        f"shape (blocks, in_features); got {got}")
            in_features = int(in_scale.shape[-1])
        else:
            in_features = self.in_features
        expected = self._expected_shapes(in_features)
        if lazy and set(expected) - set(given):
            missing = sorted(prefix + key for key in set(expected) - set(given))
            return (f"{name}: the state dict gives {sorted(prefix + key for key in given)} but not {missing}; a lazy "
                    "layer learns its width from a state dict with all of its tensors")
        for key, value in given.items():
            if tuple(value.shape) != expected[key]:
                return f"{name}: loaded {prefix + key!r} has shape {tuple(value.shape)}, expected {expected[key]}"
        perm = given.get("permutation")
        if perm is not None and not perm.is_meta:
            if perm.dtype.is_floating_point or perm.dtype.is_complex or perm.dtype == torch.bool or not torch.equal(
                    perm.sort(dim=-1).values, torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)):
                return (f"{name}: loaded {prefix + 'permutation'!r} is not a permutation of 0..{perm.shape[-1] - 1} "
                        "in every (stage, block)")
        return None

    # ---------------------------------------------------------------------------------- materialise
    def initialize_parameters(self, x: torch.Tensor, *args: object, **kwargs: object) -> None:
        """LazyModuleMixin hook: infer ``in_features`` from the last dimension of the first input."""
        if self.has_uninitialized_params():
            if not isinstance(x, torch.Tensor) or x.dim() == 0:
                raise ValueError(f"{type(self).__name__} expects a tensor of shape (*, in_features)")
            if in_functorch_transform():  # the draws would write captured buffers (torch then errs or crashes)
                raise RuntimeError(
                    f"{type(self).__name__}: a lazy layer cannot infer in_features inside a torch.func transform "
                    "(grad, vmap, jvp, ...): run one forward outside it first, or give in_features")
            # Outside inference mode: parameters and permutation drawn there would be inference tensors, which
            # no later forward with gradients could save for backward.
            with torch.inference_mode(False):
                self._materialize(x.shape[-1])

    def _materialize(self, in_features: int) -> None:
        in_features = _as_width("in_features", in_features, allow_none=False)
        self._check_fits_in_memory(in_features)
        self._set_in_features(in_features)
        with torch.no_grad():
            for name, shape in self._expected_shapes(in_features).items():
                getattr(self, name).materialize(shape)
            self.reset_parameters()
        self._generator = None  # drawn once; not kept (generators are not part of the module's state)

    def reset_parameters(self) -> None:
        """Draw fresh permutations and scales as configured by ``init`` (from ``generator`` if given)."""
        if self.in_features is None:
            return
        if self.permutation.is_meta:  # shapes only (dreidel.load checks a config on the meta device): no draws,
            self._build_indices()  # whose cost grows with the declared sizes before the tensor file is checked
            return
        gen, n, length = self._generator, self.in_features, self.transform_length
        with torch.no_grad():
            perms = [torch.randperm(length, generator=gen) for _ in range(self.depth * self.num_blocks)]
            self.permutation.copy_(torch.stack(perms).view(self.depth, self.num_blocks, length))
            self.in_scale.copy_(self._draw_diagonal(self.in_scale.shape, gen))
            if self.inner_scale is not None:
                self.inner_scale.copy_(self._draw_diagonal(self.inner_scale.shape, gen))
            self.out_scale.fill_(math.sqrt(length / n))
            if self.bias is not None:
                self.bias.zero_()
        self._build_indices()

    def _draw_diagonal(self, shape: torch.Size, gen: torch.Generator | None) -> torch.Tensor:
        if self.init == "random_sign":
            return torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
        return values / values.square().mean(dim=-1, keepdim=True).sqrt()  # unit mean square per block

    def _build_indices(self) -> None:
        """Derived (non-persistent) flat indices over the ``B·L`` stacked layout, rebuilt from ``permutation``."""
        perm = self.permutation
        if _dispatches_plainly(perm):  # not while make_fx or a dispatch mode traces the module
            _check_permutation(perm, self._expected_shapes(self.in_features)["permutation"])
        # Never inference tensors, even when rebuilt under torch.inference_mode (the first forward after .to(),
        # a load_state_dict there): autograd saves them, so a later training step or double backward would fail.
        with torch.inference_mode(False):
            indices = _indices_from(perm, self.in_features, self.transform_length)
            values = perm.detach().clone(memory_format=torch.contiguous_format)  # compared byte for byte
        replaced = self._buffers.get("_flat_perm")
        for name, value in zip(_INDEX_NAMES, indices):
            self.register_buffer(name, value, persistent=False)
        version = None if perm.is_inference() else perm._version
        self._index_source = _IndexSource(perm, version, self._buffers["_flat_perm"], values, replaced)

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to(device)``, ``.cuda()``, ``to_empty()``, ...), which puts new tensors in
        every buffer: indices this layer built are then rebuilt from ``permutation`` at their next use. (They
        used to pass for indices supplied with the permutation, so in-place changes to ``permutation`` after a
        device move were ignored, and ``to_empty``'s uninitialised indices reached the kernels.) Integer buffers
        (``permutation`` and the indices) stay integer where ``fn`` would make them floating: ``Module.type(
        torch.float64)`` casts every tensor, and a floating permutation indexes nothing (the next call failed in
        ``scatter``); ``.to(dtype)``, ``.double()`` and ``.half()`` leave integer tensors alone anyway."""
        source = getattr(self, "_index_source", None)
        built_here = source is not None and self._buffers.get("_flat_perm") is source.flat_perm

        def keeping_integers(t: torch.Tensor) -> torch.Tensor:
            result = fn(t)
            if t.is_floating_point() or t.is_complex() or not (result.is_floating_point() or result.is_complex()):
                return result
            return t.to(device=result.device)

        module = super()._apply(keeping_integers, recurse)
        if built_here:  # the moved permutation, marked stale (no values): a permutation given for one call
            # (functional_call) still tells itself apart from it, and is not kept (it was, and the layer's own
            # then counted as replaced: derived on every forward, 4x slower for 64 features)
            self._index_source = _IndexSource(self._buffers["permutation"], None, self._buffers["_flat_perm"], None,
                                              None)
        return module

    # -------------------------------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        check_dense_input(self, x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            got = "a 0-d tensor" if x.dim() == 0 else f"{x.shape[-1]} (input shape {tuple(x.shape)})"
            raise ValueError(
                f"{type(self).__name__}: expected {self.in_features} input features in the last dimension, got {got}"
            )
        check_input_dtype_and_device(self, x, self.in_scale)

    def _layout_derived_from(self, permutation: torch.Tensor) -> SpectralLayout:
        """The layout with indices derived from ``permutation`` for this call only (not kept as buffers)."""
        indices = _indices_from(permutation, self.in_features, self._transform_length)
        return SpectralLayout(*indices, self._transform_length, self._num_blocks, self.out_features)

    def _checked_layout_for_call(self, permutation: torch.Tensor) -> SpectralLayout:
        """``_layout_derived_from``, ``permutation`` checked first where its values can be read (a plain buffer, also
        under ``vmap`` or ``grad``; not where ops are traced or rewritten)."""
        if _checkable(permutation):
            _check_permutation(permutation, self._expected_shapes(self.in_features)["permutation"])
        return self._layout_derived_from(permutation)

    def layout(self) -> SpectralLayout:
        """The index tensors and sizes that the functional forward/backward need.

        They are derived from ``permutation``: for the call only where it was replaced (``functional_call`` with
        another layer's state dict, under ``vmap`` too), and rebuilt and kept where its values changed since
        they were built: in place (its version counter), or, on the CPU, through ``.data`` or a NumPy view,
        which no counter sees (a memcmp with the values built from: 1-3 microseconds for 4096 features), and
        after ``.to()`` (at their next use). Not kept where that use runs under a torch.func transform, a fake or
        another dispatch mode (derived for the call; the next plain forward rebuilds them).
        Indices supplied together with it
        (``torch.func.stack_module_state`` ensembles carry every buffer) are used as given. Under
        ``torch.compile`` and ``torch.export`` none of those checks can be traced (a compiled module would keep
        the indices of the permutation it was traced with; an exported one did, for a permutation given through
        ``functional_call``), so the graph derives the indices from ``permutation`` on every call:
        ``O(depth · B·L)`` small ops, against the transforms' ``O(rows · depth · B·L log L)``.
        """
        buffers = self._buffers  # direct lookups: nn.Module.__getattr__ costs about a microsecond each
        source = self._index_source
        if _is_compiling():  # torch.export too, whose tracing swaps every buffer for a stand-in
            return self._layout_derived_from(buffers["permutation"])
        flat_perm = buffers["_flat_perm"]
        # Our indices, or the ones they replaced, put back by a functional_call (given this layer's own buffers)
        # that rebuilt them during the call: those are stale (they were kept, giving wrong results from then on).
        restored = flat_perm is source.replaced and flat_perm is not None
        if flat_perm is source.flat_perm or restored:
            permutation = buffers["permutation"]
            # Derived for this call only for a permutation replaced for a call (functional_call with another
            # layer's state, over vmap too, whose batched wrappers must not outlive it as buffers).
            if permutation is not source.permutation:
                return self._checked_layout_for_call(permutation)
            if (restored or source.values is None
                    or (source.version is not None and permutation._version != source.version)
                    or not _same_values(permutation, source.values)):
                if not _plain(permutation):
                    # Stale indices (after .to(), an in-place change) met under a torch.func transform, a fake or
                    # another dispatch mode: built there, they would be its wrapped or fake tensors, kept as
                    # buffers past it (the next eager forward read a fake tensor's memory and crashed). Derived
                    # for this call only; the first plain forward rebuilds and keeps them.
                    return self._checked_layout_for_call(permutation)
                self._build_indices()
        return SpectralLayout(buffers["_input_gather"], buffers["_scale_gather"], buffers["_flat_perm"],
                              buffers["_flat_inverse"], buffers["_input_scatter"], self._transform_length,
                              self._num_blocks, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(*, in_features)`` float tensor → ``(*, out_features)`` of the same dtype."""
        self._check_input(x)
        try:  # direct lookups: nn.Module.__getattr__ costs about a microsecond each
            params = self._parameters
            in_scale, inner_scale, out_scale, bias = (params["in_scale"], params["inner_scale"], params["out_scale"],
                                                      params["bias"])
        except KeyError:  # a parametrization (torch.nn.utils.parametrize) turns a parameter into a property
            in_scale, inner_scale, out_scale, bias = self.in_scale, self.inner_scale, self.out_scale, self.bias
        if _autocast_applies(x):  # computed in autocast's dtype, as nn.Linear is (the op has no autocast rule)
            dtype = torch.get_autocast_dtype(x.device.type)
            x, in_scale, inner_scale, out_scale, bias = (
                None if t is None else t.to(dtype) for t in (x, in_scale, inner_scale, out_scale, bias))
        y = spectral_linear(x, in_scale, inner_scale, out_scale, bias, self.layout())
        return y if self._activation_fn is None else self._activation_fn(y)

    # ------------------------------------------------------------------------------------- helpers
    def dense_matrix(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` float64 matrix ``W`` with ``y = act(W x + b)`` (from the identity)."""
        n = self._require_in_features()
        with torch.no_grad():
            eye = torch.eye(n, dtype=torch.float64, device=self.in_scale.device)
            inner = None if self.inner_scale is None else self.inner_scale.double()
            spectral = spectral_stages(eye, self.in_scale.double(), inner, self.layout())[-1][:, : self.out_features]
            return (spectral * self.out_scale.double()).T.contiguous()

    def num_parameters(self) -> int:
        """Parameter count, frozen ones included (``O(N)``: the scales and the bias)."""
        return sum(p.numel() for p in self.parameters() if not isinstance(p, UninitializedParameter))

    def extra_repr(self) -> str:
        lazy = "lazy" if self.in_features is None else f"transform_length={self.transform_length}, blocks={self.num_blocks}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, depth={self.depth}, "
                f"bias={self.bias is not None}, activation={self.activation!r}, init={self.init!r}, {lazy}")

    def config(self) -> dict[str, object]:
        """The constructor's shape-defining arguments as plain data: ``type(self)(**config())`` rebuilds it."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "activation": self.activation, "init": self.init}

    def per_sample_grads(
        self, inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor
    ) -> dict[nn.Parameter, torch.Tensor]:
        """``PerSampleGradients`` protocol (``dreidel.layers._curvature``); see ``spectral_per_sample_grads``."""
        return spectral_per_sample_grads(self, inputs, grad_output)


def _after_load(module: _SpectralLinearBase, incompatible_keys: object) -> None:
    """After ``load_state_dict`` (whose tensors ``_state_dict_error`` checked): learn a lazy ``in_features`` from
    the loaded shapes and rebuild indices."""
    if isinstance(module.in_scale, UninitializedParameter):
        return  # nothing was loaded for this module (e.g. strict=False with missing keys)
    module._set_in_features(module.in_scale.shape[-1])
    module._generator = None
    module._build_indices()


class LinearWHT(_SpectralLinearBase):
    """``y = act(s_out ⊙ H P (s_in ⊙ x) + b)``: an ``O(N)``-parameter, ``O(N log N)``-time linear map.

    Args:
        in_features: input width, or — when ``out_features`` is omitted — the output width, with the input
            width inferred on the first forward pass (``LinearWHT(1024, activation="relu")``).
        out_features: output width.
        bias: learn an additive bias (zero at initialisation).
        activation: ``None`` or a name from ``dreidel.layers.ACTIVATIONS`` ("relu", "gelu", "tanh", "silu", ...).
        init: "variance_preserving" (Gaussian scales) or "random_sign" (±1 scales); see the module docstring.
        generator: source of the permutations and scales; the default RNG when None.
        device, dtype: where and in which float dtype the parameters live.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``, like ``nn.Linear``.
    """

    def __init__(self, in_features: int | None, out_features: int | None = None, bias: bool = True,
                 activation: str | None = None, init: str = "variance_preserving",
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, depth=1, bias=bias, activation=activation, init=init,
                         generator=generator, device=device, dtype=dtype)


class DeepSpectralLinear(_SpectralLinearBase):
    """``depth`` cascaded ``H P (s ⊙ ·)`` stages between ``s_in`` and ``s_out``; ``depth`` is the expressivity dial.

    Same arguments and shapes as ``LinearWHT`` plus ``depth`` (>= 1; ``depth=1`` is a ``LinearWHT``).
    Parameters: ``B·(n + (depth - 1)·L) + 2·out_features``; time ``O(depth · B·L log L)`` per row.
    """

    def __init__(self, in_features: int | None, out_features: int | None = None, depth: int = 2,
                 bias: bool = True, activation: str | None = None, init: str = "variance_preserving",
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, depth=depth, bias=bias, activation=activation, init=init,
                         generator=generator, device=device, dtype=dtype)

    def config(self) -> dict[str, object]:
        return {**super().config(), "depth": self.depth}
