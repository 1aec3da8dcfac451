"""Declarative name mappings between checkpoints and :class:`~dreidel.models.whisper.model.Whisper`.

A mapping is a list of rules ``(checkpoint name, (our name, ...))``. One target copies the tensor; several
targets split it along dim 0 into equal parts (CTranslate2 fuses self-attention q/k/v and cross-attention k/v);
a ``None`` target drops that part. The only part ever dropped is the key-projection bias, which CTranslate2
stores as zeros: a bias on the keys adds the same ``q·b`` to every logit of a query row, and softmax is
invariant to that shift, so dropping it is exact (Whisper itself has no key bias).

Both directions come from the same rules, so a round trip is exact by construction and the tests check it.
Any checkpoint name without a rule, any of our names left unfilled, and any shape mismatch raise a
``ValueError`` naming the tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dreidel.models.whisper.model import WhisperDimensions

__all__ = [
    "ct2_rules",
    "hf_rules",
    "checkpoint_to_ours",
    "ours_to_checkpoint",
    "dims_from_ct2",
    "dims_from_hf_config",
    "dims_to_hf_config",
    "CT2_CONFIG_VARIABLES",
    "HF_TIED_OUTPUT",
]

Rule = tuple[str, tuple[str | None, ...]]

# --- CTranslate2 (WhisperSpec) -------------------------------------------------------------------------------
# Per-block names; "self_attention" is fused q|k|v, "attention" (cross) has q alone and fused k|v.
_CT2_ATTENTION = {
    "self_attention/linear_0/weight": ("attn.query.weight", "attn.key.weight", "attn.value.weight"),
    "self_attention/linear_0/bias": ("attn.query.bias", None, "attn.value.bias"),
    "self_attention/linear_1/weight": ("attn.out.weight",),
    "self_attention/linear_1/bias": ("attn.out.bias",),
    "self_attention/layer_norm/gamma": ("attn_ln.weight",),
    "self_attention/layer_norm/beta": ("attn_ln.bias",),
}
_CT2_CROSS_ATTENTION = {
    "attention/linear_0/weight": ("cross_attn.query.weight",),
    "attention/linear_0/bias": ("cross_attn.query.bias",),
    "attention/linear_1/weight": ("cross_attn.key.weight", "cross_attn.value.weight"),
    "attention/linear_1/bias": (None, "cross_attn.value.bias"),
    "attention/linear_2/weight": ("cross_attn.out.weight",),
    "attention/linear_2/bias": ("cross_attn.out.bias",),
    "attention/layer_norm/gamma": ("cross_attn_ln.weight",),
    "attention/layer_norm/beta": ("cross_attn_ln.bias",),
}
_CT2_FFN = {
    "ffn/linear_0/weight": ("mlp_in.weight",),
    "ffn/linear_0/bias": ("mlp_in.bias",),
    "ffn/linear_1/weight": ("mlp_out.weight",),
    "ffn/linear_1/bias": ("mlp_out.bias",),
    "ffn/layer_norm/gamma": ("mlp_ln.weight",),
    "ffn/layer_norm/beta": ("mlp_ln.bias",),
}
_CT2_GLOBAL = {
    "encoder/conv1/weight": ("encoder.conv1.weight",),
    "encoder/conv1/bias": ("encoder.conv1.bias",),
    "encoder/conv2/weight": ("encoder.conv2.weight",),
    "encoder/conv2/bias": ("encoder.conv2.bias",),
    "encoder/position_encodings/encodings": ("encoder.positional_embedding",),
    "encoder/layer_norm/gamma": ("encoder.ln_post.weight",),
    "encoder/layer_norm/beta": ("encoder.ln_post.bias",),
    "decoder/embeddings/weight": ("decoder.token_embedding.weight",),
    "decoder/position_encodings/encodings": ("decoder.positional_embedding",),
    "decoder/layer_norm/gamma": ("decoder.ln.weight",),
    "decoder/layer_norm/beta": ("decoder.ln.bias",),
}
#: Scalars that describe the architecture rather than hold weights; not mapped. The heads give the dimensions,
#: the flags in _CT2_WHISPER_FLAGS must hold Whisper's values (:func:`dims_from_ct2`), the alignment ones
#: (word timestamps) are not used.
CT2_CONFIG_VARIABLES = frozenset({
    "encoder/num_heads", "decoder/num_heads", "decoder/activation", "decoder/alibi", "decoder/alignment_heads",
    "decoder/alignment_layer", "decoder/pre_norm", "decoder/scale_embeddings", "decoder/start_from_zero_embedding",
    "encoder/activation", "encoder/pre_norm", "encoder/scale_embeddings",
    # ALiBi's options, written (as 0) by CTranslate2's converters since 4.x; moot, since decoder/alibi must be 0
    "decoder/alibi_use_positive_positions", "decoder/scale_alibi",
})
# CTranslate2's value for each flag in a Whisper model.bin, and what it means (ActivationType 3 is GELU).
_CT2_WHISPER_FLAGS = {
    "encoder/pre_norm": (1, "pre-norm"), "decoder/pre_norm": (1, "pre-norm"),
    "encoder/activation": (3, "GELU"), "decoder/activation": (3, "GELU"),
    "decoder/alibi": (0, "no ALiBi"), "encoder/scale_embeddings": (0, "unscaled embeddings"),
    "decoder/scale_embeddings": (0, "unscaled embeddings"),
    "decoder/start_from_zero_embedding": (0, "no zero start embedding"),
}
_CT2_TIED_OUTPUT = "decoder/projection/weight"  # an alias of the token embedding in every Whisper model.bin


def ct2_rules(dims: WhisperDimensions) -> list[Rule]:
    """Rules from CTranslate2 WhisperSpec variable names to ours."""
    rules: list[Rule] = list(_CT2_GLOBAL.items())
    for i in range(dims.n_audio_layer):
        for name, targets in (_CT2_ATTENTION | _CT2_FFN).items():
            rules.append((f"encoder/layer_{i}/{name}", _prefixed(f"encoder.blocks.{i}.", targets)))
    for i in range(dims.n_text_layer):
        for name, targets in (_CT2_ATTENTION | _CT2_CROSS_ATTENTION | _CT2_FFN).items():
            rules.append((f"decoder/layer_{i}/{name}", _prefixed(f"decoder.blocks.{i}.", targets)))
    return rules


# --- Hugging Face transformers (WhisperForConditionalGeneration) ----------------------------------------------
_HF_ATTENTION = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "fc1": "mlp_in", "fc2": "mlp_out", "final_layer_norm": "mlp_ln",
}
_HF_CROSS_ATTENTION = {
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
}
_HF_GLOBAL = {
    "model.encoder.conv1.weight": "encoder.conv1.weight",
    "model.encoder.conv1.bias": "encoder.conv1.bias",
    "model.encoder.conv2.weight": "encoder.conv2.weight",
    "model.encoder.conv2.bias": "encoder.conv2.bias",
    "model.encoder.embed_positions.weight": "encoder.positional_embedding",
    "model.encoder.layer_norm.weight": "encoder.ln_post.weight",
    "model.encoder.layer_norm.bias": "encoder.ln_post.bias",
    "model.decoder.embed_tokens.weight": "decoder.token_embedding.weight",
    "model.decoder.embed_positions.weight": "decoder.positional_embedding",
    "model.decoder.layer_norm.weight": "decoder.ln.weight",
    "model.decoder.layer_norm.bias": "decoder.ln.bias",
}
#: The output projection of WhisperForConditionalGeneration; tied to the token embedding (ours has no copy).
HF_TIED_OUTPUT = ("proj_out.weight", "model.decoder.embed_tokens.weight")
_NO_BIAS = ("attn.key", "cross_attn.key")


def hf_rules(dims: WhisperDimensions) -> list[Rule]:
    """Rules from transformers ``WhisperForConditionalGeneration`` state-dict names to ours."""
    rules: list[Rule] = [(name, (ours,)) for name, ours in _HF_GLOBAL.items()]
    stacks = (("encoder", dims.n_audio_layer, _HF_ATTENTION), ("decoder", dims.n_text_layer,
                                                                 _HF_ATTENTION | _HF_CROSS_ATTENTION))
    for stack, n_layer, table in stacks:
        for i in range(n_layer):
            for hf_module, our_module in table.items():
                params = ("weight",) if our_module in _NO_BIAS else ("weight", "bias")
                for param in params:
                    rules.append((f"model.{stack}.layers.{i}.{hf_module}.{param}",
                                  (f"{stack}.blocks.{i}.{our_module}.{param}",)))
    return rules


# --- the engine ------------------------------------------------------------------------------------------------
def _prefixed(prefix: str, targets: tuple[str | None, ...]) -> tuple[str | None, ...]:
    return tuple(None if t is None else prefix + t for t in targets)


def checkpoint_to_ours(rules: list[Rule], tensors: dict[str, Tensor], expected: dict[str, torch.Size],
                       source: str = "checkpoint", ignore: frozenset[str] = frozenset()) -> dict[str, Tensor]:
    """Map checkpoint ``tensors`` to our names by ``rules``; ``expected`` is our name -> shape.

    Raises ``ValueError`` naming the first unknown checkpoint tensor (not in ``rules`` nor ``ignore``), the
    first checkpoint tensor a rule needs but that is absent or not floating-point (an integer weight is a
    quantised one that lost its scale, or no weight at all), and any shape that does not fit.
    """
    known = {name for name, _ in rules}
    unknown = sorted(set(tensors) - known - set(ignore))
    if unknown:
        raise ValueError(f"{source}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    ours: dict[str, Tensor] = {}
    for name, targets in rules:
        if name not in tensors:
            raise ValueError(f"{source}: missing tensor {name!r}")
        tensor = tensors[name]
        if not tensor.is_floating_point():
            raise ValueError(f"{source}: tensor {name!r} holds {str(tensor.dtype).removeprefix('torch.')} values, "
                             f"expected floating-point weights (a quantised int8/int16 weight needs a "
                             f"floating-point {name + '_scale'!r})")
        if tensor.dim() == 0 or tensor.shape[0] % len(targets):
            raise ValueError(f"{source}: tensor {name!r} of shape {tuple(tensor.shape)} cannot be split into "
                             f"{len(targets)} equal parts along dim 0")
        for target, part in zip(targets, tensor.chunk(len(targets), dim=0)):
            if target is None:
                continue
            if target not in expected:
                raise ValueError(f"{source}: tensor {name!r} maps to {target!r}, which the model does not have")
            if part.shape != expected[target]:
                raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}; {target!r} needs "
                                 f"{tuple(expected[target])}" + (f" (x{len(targets)} fused)" if len(targets) > 1
                                                                  else ""))
            ours[target] = part.contiguous()
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"{source}: nothing maps to model tensor {missing[0]!r} ({len(missing)} missing in all)")
    return ours


def ours_to_checkpoint(rules: list[Rule], state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`checkpoint_to_ours`: fused tensors are concatenated, dropped parts written as zeros."""
    out: dict[str, Tensor] = {}
    for name, targets in rules:
        missing = [t for t in targets if t is not None and t not in state_dict]
        if missing:
            raise ValueError(f"state dict lacks {missing[0]!r} (needed for {name!r})")
        template = next(state_dict[t] for t in targets if t is not None)
        parts = [torch.zeros_like(template) if t is None else state_dict[t] for t in targets]
        out[name] = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


# --- dimensions --------------------------------------------------------------------------------------------------
def _count_layers(names, prefix: str) -> int:
    layers = {name[len(prefix):].split("/", 1)[0] for name in names if name.startswith(prefix)}
    return len({index for index in layers if index.isdigit()})


def _scalar(variables: dict[str, Tensor], name: str, source: str) -> int:
    if name not in variables:
        raise ValueError(f"{source}: missing tensor {name!r}")
    value = variables[name]
    if value.numel() != 1:
        raise ValueError(f"{source}: {name!r} must hold one value, got shape {tuple(value.shape)}")
    number = value.reshape(()).item()
    if isinstance(number, bool) or number != number or abs(number) == float("inf") or number != int(number):
        raise ValueError(f"{source}: {name!r} must hold a whole number, got {number!r}")  # int() truncated 2.9
    return int(number)


def _shape(variables: dict[str, Tensor], name: str, rank: int, source: str) -> torch.Size:
    shape = variables[name].shape
    if len(shape) != rank:
        raise ValueError(f"{source}: tensor {name!r} must have {rank} dimensions, got shape {tuple(shape)}")
    return shape


def dims_from_ct2(variables: dict[str, Tensor], source: str = "model.bin") -> WhisperDimensions:
    """Dimensions read off the shapes of a CTranslate2 WhisperSpec checkpoint (pre-norm, GELU, no ALiBi)."""
    for name in ("encoder/conv1/weight", "encoder/position_encodings/encodings", "decoder/embeddings/weight",
                 "decoder/position_encodings/encodings"):
        if name not in variables:
            raise ValueError(f"{source}: missing tensor {name!r}")
    for name, (required, meaning) in _CT2_WHISPER_FLAGS.items():
        if name in variables and (value := _scalar(variables, name, source)) != required:
            raise ValueError(f"{source}: {name} is {value}, but Whisper has {required} ({meaning}); this model is "
                             f"not a Whisper dreidel can run")
    conv1 = _shape(variables, "encoder/conv1/weight", 3, source)
    embedding = _shape(variables, "decoder/embeddings/weight", 2, source)
    return _dimensions(source,
        n_mels=conv1[1],
        n_audio_ctx=_shape(variables, "encoder/position_encodings/encodings", 2, source)[0],
        n_audio_state=conv1[0],
        n_audio_head=_scalar(variables, "encoder/num_heads", source),
        n_audio_layer=_count_layers(variables, "encoder/layer_"),
        n_vocab=embedding[0],
        n_text_ctx=_shape(variables, "decoder/position_encodings/encodings", 2, source)[0],
        n_text_state=embedding[1],
        n_text_head=_scalar(variables, "decoder/num_heads", source),
        n_text_layer=_count_layers(variables, "decoder/layer_"),
    )


def _dimensions(source: str, **sizes: int) -> WhisperDimensions:
    """``WhisperDimensions(**sizes)``, its refusal naming ``source``."""
    try:
        return WhisperDimensions(**sizes)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


_HF_CONFIG_FIELDS = {
    "n_mels": "num_mel_bins", "n_audio_ctx": "max_source_positions", "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads", "n_audio_layer": "encoder_layers", "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions", "n_text_state": "d_model", "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}


def dims_from_hf_config(config: dict) -> WhisperDimensions:
    """Dimensions from a transformers ``config.json`` (a dict)."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    missing = [key for key in _HF_CONFIG_FIELDS.values() if key not in config]
    if missing:
        raise ValueError(f"Whisper config.json lacks {missing[0]!r}")
    if config.get("model_type", "whisper") != "whisper":
        raise ValueError(f"config.json model_type is {config['model_type']!r}, expected 'whisper'")
    return WhisperDimensions(**{ours: config[theirs] for ours, theirs in _HF_CONFIG_FIELDS.items()})


def dims_to_hf_config(dims: WhisperDimensions) -> dict:
    """The transformers ``WhisperConfig`` keyword arguments for ``dims`` (encoder/decoder widths must agree)."""
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError("transformers' Whisper needs n_audio_state == n_text_state")
    config = {theirs: getattr(dims, ours) for ours, theirs in _HF_CONFIG_FIELDS.items()}
    config["encoder_ffn_dim"] = config["decoder_ffn_dim"] = 4 * dims.n_audio_state
    return config
