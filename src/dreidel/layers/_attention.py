"""Multi-head attention whose q/k/v/out projections come from the linear-kind registry (spectral by default).

Attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (Vaswani et al. 2017,
arXiv:1706.03762). Incremental decoding keeps projected keys and values in a ``KVCache`` that the layer
updates in place, so the forward pass returns a plain tensor and stays usable inside ``nn.Sequential``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dreidel.algo._fwht import _refuse_flags
from dreidel.layers._registry import build_linear, config_kwargs
from dreidel.layers._spectral import _as_width, check_dense_input

__all__ = ["KVCache", "MultiHeadAttentionSpectral"]


@dataclass
class KVCache:
    """Projected keys and values of the positions seen so far, each ``(batch, heads, positions, head_dim)``.

    Empty (``None``) until the first call. For self-attention each call appends its new positions; for
    cross-attention (``context=`` given) the first call stores the projected context and later calls reuse it.
    A cache serves one kind: ``cross`` records which (None while empty), and a call of the other kind is refused.
    """

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    cross: bool | None = None

    @property
    def length(self) -> int:
        """Number of cached positions."""
        return 0 if self.key is None else self.key.shape[-2]


class MultiHeadAttentionSpectral(nn.Module):
    """Multi-head (self- or cross-) attention with registry-built projections.

    Args:
        embed_dim: model width ``E`` (divisible by ``num_heads``).
        num_heads: number of heads; ``head_dim = E / num_heads``.
        linear: registry kind of the four projections ("wht", "deep_wht", "dense", ...).
        bias: biases in the projections.
        causal: mask future positions (self-attention only).
        dropout: attention dropout probability, applied in training mode only.
        generator: passed to spectral projections for reproducible permutations and scales.
        linear_kwargs: extra arguments for ``build_linear`` (e.g. ``{"depth": 3}``).

    Shapes: ``x`` ``(B, T, E)``; ``context`` ``(B, S, E)``; output ``(B, T, E)``.

    Attention runs on ``F.scaled_dot_product_attention``, whose fused CPU kernel has no second derivative and
    no forward-mode formula in torch (``nn.MultiheadAttention`` fails alike): for double backward,
    ``torch.func.hessian`` or ``jacfwd``, run the layer under
    ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, linear: str = "wht", bias: bool = True,
                 causal: bool = False, dropout: float = 0.0, generator: torch.Generator | None = None,
                 linear_kwargs: dict[str, object] | None = None) -> None:
        super().__init__()
        embed_dim = _as_width("embed_dim", embed_dim, allow_none=False)  # NumPy ints too, as nn.MultiheadAttention
        num_heads = _as_width("num_heads", num_heads, allow_none=False)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        _refuse_flags(causal=causal)  # a truthy string ("no") would otherwise switch masking on
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
            raise TypeError(f"dropout must be a float in [0, 1), got {type(dropout).__name__} {dropout!r}")
        dropout = float(dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.dropout, self.linear = causal, dropout, linear
        self._bias = bias
        self._linear_kwargs = config_kwargs(linear_kwargs)  # generator / device / dtype: not in config()
        kwargs = dict(linear_kwargs or {})
        if generator is not None:
            kwargs.setdefault("generator", generator)
        self.query, self.key, self.value, self.out = (
            build_linear(linear, embed_dim, embed_dim, bias, **kwargs) for _ in range(4)
        )

    def config(self) -> dict[str, object]:
        """The constructor's arguments as plain data: ``MultiHeadAttentionSpectral(**config())`` rebuilds its shapes."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "linear": self.linear, "bias": self._bias,
                "causal": self.causal, "dropout": self.dropout, "linear_kwargs": dict(self._linear_kwargs)}

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def _check(self, name: str, t: torch.Tensor, batch: int | None) -> None:
        check_dense_input(self, t, name)
        if t.dim() != 3 or t.shape[-1] != self.embed_dim or (batch is not None and t.shape[0] != batch):
            raise ValueError(
                f"{name} must have shape (batch, positions, {self.embed_dim})"
                f"{'' if batch is None else f' with batch {batch}'}, got {tuple(t.shape)}"
            )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x`` ``(B, T, E)`` to itself (or to ``context``); returns ``(B, T, E)``.

        Args:
            context: ``(B, S, E)`` for cross-attention; ``None`` for self-attention.
            kv_cache: a ``KVCache`` updated in place (see its docstring); ``None`` for a full pass.
            attn_mask: optional mask broadcastable to ``(B, heads, T, keys)``: bool (True = attend, as
                ``F.scaled_dot_product_attention`` takes it; the opposite of ``nn.MultiheadAttention``'s bool
                ``attn_mask``, where True masks: give such a mask as ``~mask``) or additive float (cast to the
                attention's dtype). ``keys`` counts the cached positions too: ``S`` for cross-attention,
                ``past + T`` for self-attention with a cache holding ``past``. A query left no key (a padded
                position) attends to nothing and gets the output projection of zeros (its bias).

        Raises:
            TypeError: ``x`` or ``context`` is not a tensor, ``kv_cache`` not a ``KVCache``, ``attn_mask`` not a
                bool or floating tensor.
            ValueError: a shape that does not fit (naming the expected one), a cache of the other kind of
                attention or of another batch, ``causal`` with ``context``.
        """
        self._check("x", x, None)
        if context is not None:
            self._check("context", context, x.shape[0])
            if self.causal:
                raise ValueError("causal=True applies to self-attention; do not pass context")
        if kv_cache is not None and not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a KVCache or None, got {type(kv_cache).__name__}")
        if kv_cache is not None and kv_cache.cross is not None and kv_cache.cross != (context is not None):
            held, call = ("cross", "self") if kv_cache.cross else ("self", "cross")
            raise ValueError(f"kv_cache holds {held}-attention keys, but this is a {call}-attention call "
                             f"(context {'not ' if context is None else ''}given): use one cache per attention")
        past = 0 if kv_cache is None else kv_cache.length
        if past and kv_cache.key.shape[0] != x.shape[0]:
            raise ValueError(
                f"kv_cache holds a batch of {kv_cache.key.shape[0]}, x has a batch of {x.shape[0]}; "
                "use one KVCache per batch (a new KVCache() to start over)"
            )
        keys = (past or context.shape[1]) if context is not None else past + x.shape[1]
        self._check_mask(attn_mask, x, keys, 0 if context is not None else past)
        query = self._split_heads(self.query(x))  # (B, heads, T, head_dim)
        if attn_mask is not None:  # SDPA takes masks of 2 or more dimensions, floats of float32 or the query's dtype
            attn_mask = attn_mask.reshape((1,) * (2 - min(attn_mask.dim(), 2)) + attn_mask.shape)
            attn_mask = attn_mask.to(query.dtype) if attn_mask.is_floating_point() else attn_mask
        if context is not None and kv_cache is not None and past > 0:
            key, value = kv_cache.key, kv_cache.value  # cross-attention: the context was projected before
        else:
            source = x if context is None else context
            key, value = self._split_heads(self.key(source)), self._split_heads(self.value(source))
            if kv_cache is not None and context is None and past > 0:
                key = torch.cat((kv_cache.key, key), dim=-2)
                value = torch.cat((kv_cache.value, value), dim=-2)
        mask, is_causal = self._mask(attn_mask, x.shape[1], key.shape[-2], past, x.device)
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal
        )  # (B, heads, T, head_dim)
        out = self.out(attended.transpose(1, 2).reshape(x.shape))
        if kv_cache is not None:  # only once the call has succeeded: a failed one (a bad mask) leaves the cache
            kv_cache.key, kv_cache.value, kv_cache.cross = key, value, context is not None
        return out

    def _check_mask(self, attn_mask: object, x: torch.Tensor, keys: int, past: int) -> None:
        """Refuse an ``attn_mask`` that SDPA would fail on deep inside, or broadcast into another shape."""
        if attn_mask is None:
            return
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to the scores), got "
                            f"{attn_mask.dtype}")
        expected = (x.shape[0], self.num_heads, x.shape[1], keys)
        if attn_mask.dim() > 4 or any(size not in (1, full) for size, full in
                                       zip(reversed(attn_mask.shape), reversed(expected))):
            cached = f"; keys: {past} cached + {x.shape[1]} new" if past else ""
            raise ValueError(f"attn_mask must be broadcastable to (batch, heads, queries, keys) = {expected}{cached}, "
                             f"got shape {tuple(attn_mask.shape)}")
        if attn_mask.device != x.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, x on {x.device}")

    def _mask(self, attn_mask: torch.Tensor | None, queries: int, keys: int, past: int,
              device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """The mask for SDPA; ``is_causal`` only when queries and keys start together (no cached past)."""
        if not self.causal or (past > 0 and queries == 1):  # one new query may see every cached key
            return attn_mask, False
        if attn_mask is None and past == 0:
            return None, True
        # Query i sits at absolute position past + i and sees keys 0..past + i (bottom-right aligned).
        allowed = torch.arange(keys, device=device) <= (past + torch.arange(queries, device=device)).unsqueeze(-1)
        if attn_mask is None:
            return allowed, False
        if attn_mask.dtype == torch.bool:
            return attn_mask & allowed, False
        return attn_mask.masked_fill(~allowed, float("-inf")), False
