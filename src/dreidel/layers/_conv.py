"""Channels-last spectral convolutions: a depthwise spatial convolution, then a spectral channel mix.

A dense ``k^d · C_in · C_out`` convolution is factored into a depthwise convolution (``k^d · C_in`` weights,
one filter per channel) and a channel mix along the contiguous last axis of a channels-last tensor, done by a
linear layer from the registry (``"wht"`` by default: ``O(C)`` parameters, ``O(C log C)`` time per pixel).
This is the depthwise-separable factorisation (Chollet 2017, "Xception", arXiv:1610.02357) with the pointwise
1×1 convolution replaced by a structured Walsh-Hadamard layer.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dreidel.layers._activation import resolve_activation
from dreidel.layers._registry import build_linear, config_kwargs
from dreidel._checks import check_generator
from dreidel.layers._spectral import _as_width, check_dense_input, check_input_dtype_and_device

__all__ = ["Conv2dSpectral", "Conv3dSpectral"]

_CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {2: F.conv2d, 3: F.conv3d}
_LAYOUT_NAMES = {2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def _as_tuple(name: str, value: int | tuple[int, ...], spatial_dims: int, minimum: int) -> tuple[int, ...]:
    """``value`` (an int, NumPy's too, or a tuple or list of ``spatial_dims`` of them) as a tuple of Python ints."""
    def integer(v: object) -> int | None:
        return None if isinstance(v, bool) or not isinstance(v, numbers.Integral) else int(v)

    values = (value,) * spatial_dims if integer(value) is not None else value
    values = tuple(values) if isinstance(values, list) else values  # lists come back from a JSON config
    if (not isinstance(values, tuple) or len(values) != spatial_dims
            or not all(integer(v) is not None and v >= minimum for v in values)):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {spatial_dims} such ints, got {value!r}")
    return tuple(int(v) for v in values)


class _SpectralConvNd(nn.Module):
    """Depthwise ``spatial_dims``-D convolution on a channels-last tensor, then a linear channel mix."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int | None,
                 kernel_size: int | tuple[int, ...], stride: int | tuple[int, ...], padding: int | tuple[int, ...],
                 dilation: int | tuple[int, ...], bias: bool, activation: str | None, linear: str,
                 generator: torch.Generator | None, linear_kwargs: dict[str, object] | None) -> None:
        super().__init__()
        in_channels = _as_width("in_channels", in_channels, allow_none=False)  # NumPy ints too, as nn.Conv2d
        out_channels = in_channels if out_channels is None else _as_width("out_channels", out_channels, allow_none=False)
        self.spatial_dims = spatial_dims
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _as_tuple("kernel_size", kernel_size, spatial_dims, 1)
        self.stride = _as_tuple("stride", stride, spatial_dims, 1)
        self.padding = _as_tuple("padding", padding, spatial_dims, 0)
        self.dilation = _as_tuple("dilation", dilation, spatial_dims, 1)
        self.activation = activation
        self._activation_fn = resolve_activation(activation)
        self.linear = linear
        self._bias = bias
        self._linear_kwargs = config_kwargs(linear_kwargs)
        kwargs = dict(linear_kwargs or {})
        check_generator("generator", generator)
        check_generator("linear_kwargs['generator']", kwargs.get("generator"))
        # Variance preserving: each depthwise output sums prod(kernel) inputs with weights of variance 1/prod(kernel).
        # Drawn as before whatever the dtype, so a generator gives the same values; then placed as the channel mix.
        if generator is None:  # one given only in linear_kwargs seeds the depthwise weights too
            generator = kwargs.get("generator")
        weight = self._draw_depthwise_weight(generator).to(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        self.depthwise_weight = nn.Parameter(weight)  # (C_in, 1, *kernel)
        if generator is not None:
            kwargs.setdefault("generator", generator)
        self.channel_mix = build_linear(linear, in_channels, out_channels, bias, **kwargs)

    def _draw_depthwise_weight(self, generator: torch.Generator | None) -> torch.Tensor:
        """Fresh depthwise weights ``(C_in, 1, *kernel)``, float32 on the CPU."""
        fan_in = math.prod(self.kernel_size)
        return torch.randn((self.in_channels, 1, *self.kernel_size), generator=generator) / math.sqrt(fan_in)

    def reset_parameters(self) -> None:
        """Draw fresh depthwise weights and channel-mix parameters in place, from the distributions the
        constructor uses, with torch's global generator (a ``generator`` given to the constructor serves its
        draws only, as for the linear kinds): after ``to_empty`` on a layer built on the meta device, this
        initialises it. On the meta device it draws nothing."""
        if not self.depthwise_weight.is_meta:
            with torch.no_grad():
                self.depthwise_weight.copy_(self._draw_depthwise_weight(None))
        self.channel_mix.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: channels-last ``(N, *spatial, C_in)`` → ``(N, *spatial_out, C_out)``."""
        check_dense_input(self, x)
        if x.dim() != self.spatial_dims + 2 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected a channels-last tensor {_LAYOUT_NAMES[self.spatial_dims]} with "
                f"C={self.in_channels}, got shape {tuple(x.shape)}"
            )
        check_input_dtype_and_device(self, x, self.depthwise_weight)
        channels_first = x.movedim(-1, 1)  # a view: channels-last strides, which the CPU conv kernels accept
        spatial = _CONV_FUNCTIONS[self.spatial_dims](
            channels_first, self.depthwise_weight, None, self.stride, self.padding, self.dilation,
            groups=self.in_channels,
        )
        y = self.channel_mix(spatial.movedim(1, -1))  # (N, *spatial_out, C_out)
        return y if self._activation_fn is None else self._activation_fn(y)

    def config(self) -> dict[str, object]:
        """The constructor's arguments as plain data: ``type(self)(**config())`` rebuilds the layer's shapes.

        ``generator`` (and ``device`` / ``dtype`` in ``linear_kwargs``) only say how to initialise; the saved
        tensors carry the values and dtypes.
        """
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "bias": self._bias, "activation": self.activation,
                "linear": self.linear, "linear_kwargs": dict(self._linear_kwargs)}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, linear={self.linear!r}, "
                f"activation={self.activation!r}")


class Conv2dSpectral(_SpectralConvNd):
    """Channels-last 2-D convolution: depthwise ``kernel_size`` filter per channel, then a spectral channel mix.

    Args:
        in_channels, out_channels: channel counts (``out_channels`` defaults to ``in_channels``).
        kernel_size, stride, padding, dilation: as in ``nn.Conv2d`` (int or pair; a list is taken as a tuple),
            for the depthwise part; ``padding`` is a number of zeros per side (no string modes: for "same"
            with stride 1 and an odd kernel, pass ``(kernel_size - 1) // 2 * dilation``).
        bias: bias of the channel mix. activation: ``None`` or a name ("relu", "gelu", ...), applied last.
        linear: registry kind of the channel mix ("wht", "deep_wht", "dense", ...); ``linear_kwargs`` go to it,
            and their ``device`` and ``dtype``, if given, place the depthwise weights too (the whole layer).
        generator: source of the depthwise weights and of the spectral mix's permutations and scales (one given
            only in ``linear_kwargs`` seeds both too).

    Raises:
        TypeError: ``generator`` (or one in ``linear_kwargs``) is not a ``torch.Generator`` or None, or
            ``linear_kwargs`` not a dict of keyword arguments; ``TypeError`` / ``ValueError`` for bad sizes.

    Shapes: input ``(N, H, W, C_in)`` → output ``(N, H_out, W_out, C_out)`` (``H_out`` as for ``nn.Conv2d``).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, activation: str | None = None,
                 linear: str = "wht", generator: torch.Generator | None = None,
                 linear_kwargs: dict[str, object] | None = None) -> None:
        super().__init__(2, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, activation,
                         linear, generator, linear_kwargs)


class Conv3dSpectral(_SpectralConvNd):
    """Channels-last 3-D convolution: input ``(N, D, H, W, C_in)`` → ``(N, D_out, H_out, W_out, C_out)``.

    Same arguments as ``Conv2dSpectral`` with triples for ``kernel_size``, ``stride``, ``padding``, ``dilation``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None,
                 kernel_size: int | tuple[int, int, int] = 3, stride: int | tuple[int, int, int] = 1,
                 padding: int | tuple[int, int, int] = 0, dilation: int | tuple[int, int, int] = 1,
                 bias: bool = True, activation: str | None = None, linear: str = "wht",
                 generator: torch.Generator | None = None, linear_kwargs: dict[str, object] | None = None) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, activation,
                         linear, generator, linear_kwargs)
