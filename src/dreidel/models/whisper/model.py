"""Whisper (Radford et al., 2022, "Robust Speech Recognition via Large-Scale Weak Supervision", arXiv:2212.04356).

One implementation, configured by :class:`WhisperDimensions`. One :class:`ResidualAttentionBlock` with a
``cross_attention`` flag serves the encoder and the decoder (the openai/whisper layout). Every projection is built
by the linear-layer registry (``linear="dense"`` by default), so a spectral Whisper is the same classes built with
another kind.

Decoding runs on static key/value buffers (:class:`DecoderCache`): the self-attention cache is written in place at
the current position. Cross-attention either folds dense key/value projections into the query side and reads
the audio features directly, or (other linear kinds, quantised layers) computes keys/values once per window.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WhisperDimensions", "Whisper", "AudioEncoder", "TextDecoder", "ResidualAttentionBlock", "DecoderCache"]


@dataclass(frozen=True)
class WhisperDimensions:
    """Sizes of a Whisper model; the defaults are tiny.en."""

    n_mels: int = 80
    n_audio_ctx: int = 1500
    n_audio_state: int = 384
    n_audio_head: int = 6
    n_audio_layer: int = 4
    n_vocab: int = 51864
    n_text_ctx: int = 448
    n_text_state: int = 384
    n_text_head: int = 6
    n_text_layer: int = 4

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WhisperDimensions.{field.name} must be a positive int, got {value!r}")
        if self.n_audio_state % self.n_audio_head or self.n_text_state % self.n_text_head:
            raise ValueError("n_audio_state / n_text_state must be divisible by their head counts")

    @property
    def is_multilingual(self) -> bool:
        """English-only checkpoints have 51864 tokens, multilingual ones 51865 or more."""
        return self.n_vocab >= 51865

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def linear_factory(kind: str):
    """Return ``f(in_features, out_features, bias)`` building linear layers of registry kind ``kind``."""
    if not isinstance(kind, str):
        raise TypeError(f"linear must be a registry kind name (str), got {type(kind).__name__}")
    from dreidel.layers import build_linear, linear_kinds

    if kind not in linear_kinds():
        raise ValueError(f"linear must be one of {', '.join(linear_kinds())}, got {kind!r}")

    def build(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
        return build_linear(kind, in_features, out_features, bias=bias)

    return build


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with openai/whisper's projections (the key projection has no bias)."""

    def __init__(self, n_state: int, n_head: int, make_linear) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = make_linear(n_state, n_state)
        self.key = make_linear(n_state, n_state, bias=False)
        self.value = make_linear(n_state, n_state)
        self.out = make_linear(n_state, n_state)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, state = x.shape
        return x.view(batch, length, self.n_head, state // self.n_head).transpose(1, 2)  # (B, H, T, Dh)

    def merge_heads(self, x: Tensor) -> Tensor:
        batch, _, length, head_dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.n_head * head_dim)  # (B, T, C)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q: (B, H, Tq, Dh); k, v: (B, H, Tk, Dh) -> (B, Tq, C) after the output projection."""
        return self.out(self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))

    def forward(self, x: Tensor) -> Tensor:
        """Bidirectional self-attention (the encoder): x (B, T, C) -> (B, T, C)."""
        q, k, v = (self.split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        return self.attend(q, k, v)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block; ``cross_attention=True`` adds attention to the audio features (decoder)."""

    def __init__(self, n_state: int, n_head: int, cross_attention: bool, make_linear) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head, make_linear)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, make_linear) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp_in = make_linear(n_state, 4 * n_state)
        self.mlp_out = make_linear(4 * n_state, n_state)
        self.mlp_ln = nn.LayerNorm(n_state)

    def mlp(self, x: Tensor) -> Tensor:
        return self.mlp_out(F.gelu(self.mlp_in(self.mlp_ln(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Encoder block: x (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(x)

    def forward_cached(self, x: Tensor, layer: int, offset: int, cache: "DecoderCache",
                       mask: Tensor | None = None) -> Tensor:
        """Decoder block on new tokens x (B, T, C) at positions offset..offset+T-1, reading/writing ``cache``;
        ``mask`` from ``cache.attention_mask``."""
        attn = self.attn
        h = self.attn_ln(x)
        end = offset + x.shape[1]
        k_buf, v_buf = cache.self_k[layer], cache.self_v[layer]  # (B, H, Dh, ctx), (B, H, ctx, Dh)
        k_buf[:, :, :, offset:end] = attn.split_heads(attn.key(h)).transpose(2, 3)
        v_buf[:, :, offset:end] = attn.split_heads(attn.value(h))
        q = attn.split_heads(attn.query(h))
        x = x + attn.out(attn.merge_heads(_attention(q, k_buf[:, :, :, :end], v_buf[:, :, :end], mask)))
        cross = self.cross_attn
        q = cross.split_heads(cross.query(self.cross_attn_ln(x)))
        if cache.audio_features is not None:
            context = _absorbed_cross_attention(q, cross.key.weight, cross.value.weight, cross.value.bias,
                                                cache.audio_features)
        else:
            context = _attention(q, cache.cross_k[layer], cache.cross_v[layer])
        x = x + cross.out(cross.merge_heads(context))
        return x + self.mlp(x)


def _attention(q: Tensor, k_transposed: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Softmax attention for the few queries of a decoding step, on pre-transposed keys.

    q (B, H, T, Dh), k_transposed (B, H, Dh, S), v (B, H, S, Dh), mask (T, S) or (B, 1, T, S) bool (True =
    attend) -> (B, H, T, Dh). Two batched matmuls beat the fused SDPA kernel for T = 1 on CPU.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k_transposed)  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def _absorbed_cross_attention(q: Tensor, key_weight: Tensor, value_weight: Tensor, value_bias: Tensor | None,
                              audio: Tensor) -> Tensor:
    """Cross-attention with the key/value projections applied on the query side.

    ``q·(W_k x)`` = ``(W_kᵀ q)·x`` and ``Σ p (W_v x + b_v)`` = ``W_v (Σ p x) + b_v`` (the weights p sum to 1),
    so the audio features x are read directly and no per-layer keys/values are computed: for the few dozen
    steps of a short utterance that is fewer flops than projecting 1500 frames per layer, and every decoder
    layer reads the same x (which stays in cache) instead of its own keys and values.

    q (R, H, T, Dh) with R = W·k rows (k hypotheses per audio window, window-major); key/value weights (C, C)
    (the key has no bias); audio (W, S, C) -> (R, H, T, Dh).
    """
    rows, heads, steps, head_dim = q.shape
    windows, _, state = audio.shape
    key_weight = key_weight.view(heads, head_dim, state)
    queries = torch.einsum("rhtd,hdc->rhtc", q * head_dim**-0.5, key_weight)  # (R, H, T, C)
    queries = queries.reshape(windows, -1, state)  # (W, k·H·T, C)
    probs = torch.matmul(queries, audio.transpose(1, 2)).softmax(dim=-1)  # (W, k·H·T, S)
    mixed = torch.matmul(probs, audio).view(rows, heads, steps, state)  # (R, H, T, C)
    out = torch.einsum("rhtc,hdc->rhtd", mixed, value_weight.view(heads, head_dim, state))
    return out if value_bias is None else out + value_bias.view(heads, 1, head_dim)


class AudioEncoder(nn.Module):
    """Log-mel (B, n_mels, 2·n_audio_ctx) -> audio features (B, n_audio_ctx, n_audio_state)."""

    def __init__(self, dims: WhisperDimensions, make_linear) -> None:
        super().__init__()
        n_state = dims.n_audio_state
        self.conv1 = nn.Conv1d(dims.n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        # Sinusoidal in every released checkpoint; loaded from the checkpoint as stored.
        self.register_buffer("positional_embedding", torch.zeros(dims.n_audio_ctx, n_state))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(n_state, dims.n_audio_head, False, make_linear) for _ in range(dims.n_audio_layer)
        )
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 2·n_audio_ctx) of the model's dtype -> (B, n_audio_ctx, n_audio_state).

        Raises:
            TypeError: ``mel`` is not a tensor of the weights' dtype (``decode`` casts; this module does not).
            ValueError: another shape.
        """
        if not isinstance(mel, Tensor):
            raise TypeError(f"mel must be a torch.Tensor, got {type(mel).__name__}")
        if mel.dim() != 3 or mel.shape[1] != self.conv1.in_channels:
            raise ValueError(f"mel must be (batch, {self.conv1.in_channels}, frames), got shape {tuple(mel.shape)}")
        if mel.dtype != self.conv1.weight.dtype:
            raise TypeError(f"mel must have the model's dtype {self.conv1.weight.dtype}, got {mel.dtype} (give "
                            f"mel.to({self.conv1.weight.dtype}))")
        if mel.shape[-1] != 2 * self.positional_embedding.shape[0]:  # the stride-2 conv took 2999 frames too
            raise ValueError(
                f"mel must have {2 * self.positional_embedding.shape[0]} frames (30 s), got {mel.shape[-1]}"
            )
        x = F.gelu(self.conv1(mel))  # (B, C, 2T)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T, C)
        x = x + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class DecoderCache:
    """Static key/value buffers of one decoding run.

    self_k: per layer (R, H, Dh, n_text_ctx) (keys stored transposed), self_v: (R, H, n_text_ctx, Dh), both
    written in place, R = windows x hypotheses per window. Cross-attention reads either ``audio_features``
    (W, n_audio_ctx, C) directly (dense projections, see ``_absorbed_cross_attention``) or per-layer
    cross_k (R, H, Dh, n_audio_ctx) and cross_v (R, H, n_audio_ctx, Dh) computed once per window.
    padding: ``None``, or (R,) int64, how many positions at the start of each row are padding, so that rows
    whose prompts differ in length decode together (left-padded, as transformers batches prompts): no token
    attends to a row's padding, and each row's first real token sits at position 0 of the positional embedding.
    """

    def __init__(self, self_k: list[Tensor], self_v: list[Tensor], cross_k: list[Tensor], cross_v: list[Tensor],
                 audio_features: Tensor | None = None, padding: Tensor | None = None):
        self.self_k, self.self_v, self.cross_k, self.cross_v = self_k, self_v, cross_k, cross_v
        self.audio_features = audio_features
        self.padding = padding

    @property
    def rows(self) -> int:
        """Number of sequences (R) the buffers hold."""
        return self.self_k[0].shape[0]

    @property
    def n_ctx(self) -> int:
        """Number of positions the self-attention buffers hold."""
        return self.self_k[0].shape[-1]

    def causal_mask(self, offset: int, length: int, device: torch.device | None = None) -> Tensor:
        """Boolean (length, offset+length) mask: new token i sees positions <= offset+i."""
        rows = torch.arange(length, device=device).unsqueeze(1) + offset
        return torch.arange(offset + length, device=device).unsqueeze(0) <= rows

    def attention_mask(self, offset: int, length: int, device: torch.device | None = None) -> Tensor | None:
        """What ``length`` new tokens at positions offset.. may attend to: ``None`` (everything so far: one token,
        no padding), the causal (length, offset+length) mask, or with padding (R, 1, length, offset+length),
        which also hides each row's padding from its real tokens (a padding position sees the padding before
        it, so that no softmax is over nothing)."""
        if self.padding is None:
            return self.causal_mask(offset, length, device) if length > 1 else None
        queries = torch.arange(offset, offset + length, device=device).view(1, length, 1)
        keys = torch.arange(offset + length, device=device).view(1, 1, -1)
        starts = self.padding.to(device).view(-1, 1, 1)
        return ((keys <= queries) & ((keys >= starts) | (queries < starts))).unsqueeze(1)

    def positions(self, offset: int, length: int, device: torch.device | None = None) -> slice | Tensor:
        """Positional-embedding index of ``length`` new tokens at offset..: a slice, or with padding (R, length)
        counted from each row's first real token (padding positions take index 0)."""
        if self.padding is None:
            return slice(offset, offset + length)
        steps = torch.arange(offset, offset + length, device=device)
        return (steps.unsqueeze(0) - self.padding.to(device).unsqueeze(1)).clamp_min(0)

    def windows(self, first: int, last: int, rows_per_window: int) -> "DecoderCache":
        """The rows of windows ``first .. last - 1`` (``rows_per_window`` each), as views: writes through it
        land in this cache."""
        rows = slice(first * rows_per_window, last * rows_per_window)
        return DecoderCache([b[rows] for b in self.self_k], [b[rows] for b in self.self_v],
                            [b[rows] for b in self.cross_k], [b[rows] for b in self.cross_v],
                            None if self.audio_features is None else self.audio_features[first:last],
                            None if self.padding is None else self.padding[rows])

    def reorder(self, index: Tensor, length: int) -> None:
        """Beam search: row b of the first ``length`` positions becomes row ``index[b]`` of before."""
        for buf in self.self_k:
            buf[:, :, :, :length] = buf[index, :, :, :length]
        for buf in self.self_v:
            buf[:, :, :length] = buf[index, :, :length]


class TextDecoder(nn.Module):
    """Tokens (B, T) and a :class:`DecoderCache` -> logits (B, T, n_vocab); the output projection is tied."""

    def __init__(self, dims: WhisperDimensions, make_linear) -> None:
        super().__init__()
        n_state = dims.n_text_state
        self.n_head = dims.n_text_head
        self.token_embedding = nn.Embedding(dims.n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.zeros(dims.n_text_ctx, n_state))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(n_state, dims.n_text_head, True, make_linear) for _ in range(dims.n_text_layer)
        )
        self.ln = nn.LayerNorm(n_state)
        # None: logits use the tied token embedding. quantize_int8 installs an (int8) Linear copy here.
        self.output: nn.Module | None = None
        self._embedding_columns: Tensor | None = None  # (C, n_vocab) copy for one-row steps, see project()
        self._embedding_columns_key: tuple | None = None

    def new_cache(self, audio_features: Tensor, rows_per_window: int = 1,
                  padding: Tensor | None = None) -> DecoderCache:
        """Buffers for decoding ``rows_per_window`` hypotheses against each of audio_features (W, S, C);
        ``padding`` (W,) int64: padding positions at the start of each window's rows (see ``DecoderCache``).

        Raises:
            TypeError / ValueError: ``audio_features`` is not a tensor of shape (W, S, n_text_state) and the
                decoder's dtype; ``padding`` is not (W,) int64 counts >= 0.
        """
        n_ctx, n_state = self.positional_embedding.shape
        if not isinstance(audio_features, Tensor):
            raise TypeError(f"audio_features must be a torch.Tensor, got {type(audio_features).__name__}")
        if audio_features.dim() != 3 or audio_features.shape[-1] != n_state:
            raise ValueError(f"audio_features must be (windows, frames, {n_state}) (the encoder's output), got shape "
                             f"{tuple(audio_features.shape)}")
        if audio_features.dtype != self.positional_embedding.dtype:
            raise TypeError(f"audio_features must have the decoder's dtype {self.positional_embedding.dtype}, got "
                            f"{audio_features.dtype}")
        rows = audio_features.shape[0] * rows_per_window
        head_dim = n_state // self.n_head
        like = dict(dtype=audio_features.dtype, device=audio_features.device)
        self_k = [torch.zeros(rows, self.n_head, head_dim, n_ctx, **like) for _ in self.blocks]
        self_v = [torch.zeros(rows, self.n_head, n_ctx, head_dim, **like) for _ in self.blocks]
        if padding is not None:
            if padding.shape != (audio_features.shape[0],) or padding.dtype != torch.int64 or bool((padding < 0).any()):
                raise ValueError(f"padding must be (windows,) = ({audio_features.shape[0]},) int64 counts >= 0, got "
                                 f"shape {tuple(padding.shape)} {padding.dtype}")
            padding = padding.to(audio_features.device).repeat_interleave(rows_per_window)
        if self.dense_cross_attention():
            return DecoderCache(self_k, self_v, [], [], audio_features=audio_features, padding=padding)
        cross_k, cross_v = [], []
        for block in self.blocks:
            keys = block.cross_attn.split_heads(block.cross_attn.key(audio_features)).transpose(2, 3)
            values = block.cross_attn.split_heads(block.cross_attn.value(audio_features))
            cross_k.append(keys.repeat_interleave(rows_per_window, dim=0).contiguous())
            cross_v.append(values.repeat_interleave(rows_per_window, dim=0).contiguous())
        return DecoderCache(self_k, self_v, cross_k, cross_v, padding=padding)

    def dense_cross_attention(self) -> bool:
        """Whether every cross-attention key/value projection is a plain ``nn.Linear`` (bias-free keys)."""
        return all(type(block.cross_attn.key) is nn.Linear and block.cross_attn.key.bias is None
                   and type(block.cross_attn.value) is nn.Linear for block in self.blocks)

    def hidden(self, tokens: Tensor, offset: int, cache: DecoderCache) -> Tensor:
        """tokens (B, T) int64 at positions offset..offset+T-1 -> final normalised states (B, T, C).

        B must be the cache's number of rows, offset+T at most n_text_ctx and every id in [0, n_vocab); otherwise
        ``ValueError`` (a mismatched batch would broadcast silently against the buffers). ``TypeError`` where
        ``tokens`` is not a tensor.
        """
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a (batch, length) int64 torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be (batch, length) int64, got shape {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.numel():
            n_vocab = self.token_embedding.num_embeddings
            low, high = (int(bound) for bound in torch.aminmax(tokens))
            if low < 0 or high >= n_vocab:
                raise ValueError(f"tokens must be ids in [0, {n_vocab}) (the vocabulary size is {n_vocab}), got "
                                 f"{low if low < 0 else high}")
        if tokens.shape[0] != cache.rows:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache holds {cache.rows} rows (build it "
                             f"with new_cache from the same audio features and rows_per_window)")
        if not 0 <= offset <= cache.n_ctx - tokens.shape[1]:
            raise ValueError(f"tokens at positions {offset}..{offset + tokens.shape[1] - 1} do not fit the "
                             f"{cache.n_ctx} positions of the text context")
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[cache.positions(offset, length, tokens.device)]
        mask = cache.attention_mask(offset, length, tokens.device)
        for layer, block in enumerate(self.blocks):
            x = block.forward_cached(x, layer, offset, cache, mask)
        return self.ln(x)

    def project(self, hidden: Tensor) -> Tensor:
        """(..., C) -> logits (..., n_vocab) through the tied token embedding (or ``output`` when installed).

        The product reads the whole (n_vocab, C) matrix for every step, so its memory layout decides its speed:
        measured on AVX2 with MKL, one row runs twice as fast against a contiguous (C, n_vocab) copy, and several
        rows run fastest as ``W @ hᵀ``.
        """
        if self.output is not None:
            return self.output(hidden)
        weight = self.token_embedding.weight
        rows = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
        if rows.shape[0] == 1:
            logits = rows @ self._columns(weight)
        else:
            logits = (weight @ rows.T).T
        return logits.reshape(*hidden.shape[:-1], -1)

    def _columns(self, weight: Tensor) -> Tensor:
        """``weight.T`` made contiguous, rebuilt whenever the embedding is replaced or modified in place."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if self._embedding_columns_key != key:
            with torch.no_grad():
                self._embedding_columns = weight.detach().T.contiguous()
            self._embedding_columns_key = key
        return self._embedding_columns

    def forward(self, tokens: Tensor, offset: int, cache: DecoderCache) -> Tensor:
        """tokens (B, T) int64 at positions offset..offset+T-1 -> logits (B, T, n_vocab) float."""
        return self.project(self.hidden(tokens, offset, cache))


class Whisper(nn.Module):
    """Encoder-decoder; ``linear`` is the registry kind of every projection ("dense", "wht", "deep_wht", ...)."""

    def __init__(self, dims: WhisperDimensions, linear: str = "dense") -> None:
        super().__init__()
        if not isinstance(dims, WhisperDimensions):
            raise TypeError(f"dims must be WhisperDimensions, got {type(dims).__name__}")
        self.dims = dims
        self.linear = linear
        make_linear = linear_factory(linear)
        self.encoder = AudioEncoder(dims, make_linear)
        self.decoder = TextDecoder(dims, make_linear)

    def embed_audio(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, 3000) -> audio features (B, 1500, n_audio_state)."""
        return self.encoder(mel)

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, n_vocab) of tokens (B, T) from position 0 (no cache kept)."""
        return self.decoder(tokens, 0, self.decoder.new_cache(audio_features))

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        return self.logits(tokens, self.embed_audio(mel))
