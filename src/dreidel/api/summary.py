"""``Sequential.summary``: per-layer output shapes, parameter counts and floating-point operations per sample.

FLOPs count one multiply and one add as two operations; gathers and copies (permutations, an embedding's
lookup, flattening) count none. For a spectral layer with transform length ``L = m·2^k`` (``m`` in 1, 12, 20,
28) a fast Walsh-Hadamard transform costs ``L·k`` additions for the butterflies plus ``L·(m - 1)`` for the
``m``-point Hadamard blocks plus ``L`` for the orthonormal scaling; every diagonal scaling, the bias and the
activation add one operation per element. ``nn.Linear``: ``2·in·out`` plus ``out`` for the bias. A spectral
convolution: its depthwise kernel (``2·prod(kernel)`` per input channel and output position) and its channel
mixing (a linear layer per output position). Spectral attention over ``T`` positions: its four projections per
position, ``2·T²·E`` for the scores and as many for the weighted sum, and per score one for the scaling and
three for the softmax (the maximum, the exponential and the division; the sum's additions as well), counted
over all ``T²`` pairs even where a causal mask leaves half of them out. Layer and batch norms count five per
element (the mean, the variance, the subtraction, the division and the affine step folded in), softmax three.
Layers of other types are marked ``?`` and left out of the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dreidel.layers import Conv2dSpectral, Conv3dSpectral, DeepSpectralLinear, LinearWHT, MultiHeadAttentionSpectral

__all__ = ["LayerRow", "format_summary", "fwht_flops", "layer_flops", "summarize"]

_ELEMENTWISE = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
_FREE = (nn.Identity, nn.Dropout, nn.Flatten, nn.Embedding)
_HADAMARD_BASES = (28, 20, 12, 1)


def fwht_flops(length: int) -> int:
    """Operations of one orthonormal FWHT of ``length = m·2^k``."""
    for base in _HADAMARD_BASES:
        if length % base == 0 and (length // base) & (length // base - 1) == 0:
            log2 = int(math.log2(length // base))
            return length * log2 + length * (base - 1) + length
    raise ValueError(f"length {length} is not a supported Hadamard length m·2^k")


def _spectral_flops(layer: LinearWHT | DeepSpectralLinear) -> int:
    length, blocks = layer.transform_length, layer.num_blocks
    # a diagonal scaling before each transform: the first over the in_features real entries of each block (the
    # padded ones are zeros), the inner ones over all L
    scalings = blocks * (layer.in_features + (layer.depth - 1) * length)
    ops = blocks * layer.depth * fwht_flops(length) + scalings + layer.out_features  # + s_out
    if layer.bias is not None:
        ops += layer.out_features
    if layer.activation is not None:
        ops += layer.out_features
    return ops


def _linear_flops(layer: nn.Linear) -> int:
    return 2 * layer.in_features * layer.out_features + (layer.out_features if layer.bias is not None else 0)


# FLOPs per row of the last dimension, for layers that act along it
_ROW_FLOPS: dict[type, Callable[[nn.Module], int]] = {
    nn.Linear: _linear_flops,
    LinearWHT: _spectral_flops,
    DeepSpectralLinear: _spectral_flops,
}


def _row_flops(layer: nn.Module) -> int | None:
    """FLOPs per row of the last dimension of a linear layer (a spectral layer's own or a projection); None when
    its type is not counted."""
    count = _ROW_FLOPS.get(type(layer))
    return None if count is None else count(layer)


def _conv_flops(layer: Conv2dSpectral | Conv3dSpectral, output_shape: tuple[int, ...]) -> int | None:
    """A spectral convolution's FLOPs for one sample with channels-last ``output_shape`` ``(*spatial, C_out)``."""
    mix = _row_flops(layer.channel_mix)
    if mix is None:
        return None
    positions = math.prod(output_shape[:-1])
    depthwise = positions * layer.in_channels * 2 * math.prod(layer.kernel_size)
    activation = math.prod(output_shape) if layer.activation is not None else 0
    return depthwise + positions * mix + activation


def _attention_flops(layer: MultiHeadAttentionSpectral, input_shape: tuple[int, ...]) -> int | None:
    """Self-attention's FLOPs for one sample ``(T, E)`` (see the module docstring)."""
    projections = [_row_flops(p) for p in (layer.query, layer.key, layer.value, layer.out)]
    if any(p is None for p in projections) or len(input_shape) != 2:
        return None
    positions, width = input_shape
    scores = layer.num_heads * positions * positions
    return positions * sum(projections) + 2 * (2 * positions * positions * width) + scores * (1 + 3)


def layer_flops(layer: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int | None:
    """FLOPs for one sample through ``layer`` (shapes exclude the batch dimension); None when unknown."""
    output_elements = math.prod(output_shape)
    row = _row_flops(layer)
    if row is not None:
        return math.prod(input_shape[:-1]) * row
    if isinstance(layer, (Conv2dSpectral, Conv3dSpectral)):
        return _conv_flops(layer, output_shape)
    if isinstance(layer, MultiHeadAttentionSpectral):
        return _attention_flops(layer, input_shape)
    if isinstance(layer, _ELEMENTWISE):
        return output_elements
    if isinstance(layer, _FREE):
        return 0
    if isinstance(layer, (nn.Softmax, nn.LogSoftmax)):
        return 3 * output_elements
    if isinstance(layer, (nn.LayerNorm, nn.BatchNorm1d)):
        return 5 * output_elements
    return None


@dataclass(frozen=True)
class LayerRow:
    name: str
    layer: str
    output_shape: tuple[int, ...]
    parameters: int
    flops: int | None


def summarize(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device | str = "cpu") -> list[LayerRow]:
    """Run two zero samples ``(2, *input_shape)`` of ``dtype`` on ``device`` through ``model``'s children (two: a
    BatchNorm without running statistics takes no fewer, even in eval mode) and record each layer (a layer
    object at several positions once per position, in call order)."""
    calls: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
    handles = []
    for child in {id(child): child for child in model._modules.values()}.values():
        def hook(module, inputs, output):
            calls.setdefault(id(module), []).append((tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        handles.append(child.register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((2, *input_shape), dtype=dtype, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    rows = []
    for name, child in model._modules.items():
        layer_in, layer_out = calls[id(child)].pop(0)
        parameters = sum(p.numel() for p in child.parameters())
        rows.append(LayerRow(name, type(child).__name__, layer_out, parameters, layer_flops(child, layer_in, layer_out)))
    return rows


def format_summary(rows: list[LayerRow]) -> str:
    """A plain-text table of ``rows``: text columns left-aligned, counts right-aligned with thousands separators."""
    headers = ("#", "layer", "output shape", "params", "FLOPs/sample")
    cells = [headers] + [(r.name, r.layer, str(r.output_shape), f"{r.parameters:,}",
                          "?" if r.flops is None else f"{r.flops:,}") for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right_aligned = (False, False, False, True, True)

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, right_aligned)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(row) for row in cells[1:])])
