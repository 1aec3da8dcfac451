"""Band-limited resampling by a polyphase windowed-sinc filter, in PyTorch.

A rational rate change ``new/orig`` (reduced by their gcd) places output sample ``k = q*new + i`` at input
position ``q*orig + i*orig/new``; each phase ``i`` is one FIR kernel, so all phases run as a single strided
``conv1d`` with ``new`` output channels. The kernel is an ideal low-pass (sinc) at ``rolloff`` times the lower
Nyquist frequency, truncated to ``zero_crossings`` zero crossings on each side and tapered by a Kaiser window
(Smith, "Digital Audio Resampling", CCRMA 2002; Kaiser & Schafer 1980 for the window).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

__all__ = ["resample"]


@lru_cache(maxsize=16)
def _polyphase_kernels(orig: int, new: int, zero_crossings: int, rolloff: float, kaiser_beta: float) -> np.ndarray:
    """(new, taps) float64 kernels; tap ``j`` of phase ``i`` multiplies input ``q*orig + j - half_width``."""
    cutoff = 0.5 * min(orig, new) / orig * rolloff  # cycles per input sample
    half_width = math.ceil(zero_crossings / (2.0 * cutoff))
    taps = 2 * half_width + orig
    phase_offsets = np.arange(new)[:, None] * orig / new  # output position inside the stride, input units
    distance = phase_offsets + half_width - np.arange(taps)[None, :]  # output time minus input time
    inside = np.abs(distance) <= half_width
    window = np.where(inside, np.i0(kaiser_beta * np.sqrt(np.clip(1.0 - (distance / half_width) ** 2, 0.0, 1.0)))
                      / np.i0(kaiser_beta), 0.0)
    return 2.0 * cutoff * np.sinc(2.0 * cutoff * distance) * window


def resample(audio: torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 24,
             rolloff: float = 0.945, kaiser_beta: float = 8.6) -> torch.Tensor:
    """Resample ``audio`` of shape ``(..., samples)`` from ``orig_rate`` to ``new_rate`` Hz.

    Returns ``(..., ceil(samples * new_rate / orig_rate))`` in the input's floating dtype (float32 when given
    an integer tensor). Frequencies above ``rolloff`` times the lower Nyquist frequency are removed (stop band
    about -85 dB with the default Kaiser beta); the signal is taken as zero outside its ends.
    """
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor, got {type(audio).__name__}")
    for name, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or rate <= 0:
            raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")
    if not audio.is_floating_point():
        audio = audio.to(torch.float32)
    if orig_rate == new_rate:
        return audio.clone()
    divisor = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // divisor, int(new_rate) // divisor
    n_in = audio.shape[-1]
    n_out = -(-n_in * new // orig)  # ceil
    leading = audio.shape[:-1]
    if n_in == 0:
        return audio.new_zeros(*leading, 0)
    compute_dtype = torch.float64 if audio.dtype == torch.float64 else torch.float32
    kernels = torch.from_numpy(_polyphase_kernels(orig, new, zero_crossings, rolloff, kaiser_beta))
    kernels = kernels.to(device=audio.device, dtype=compute_dtype)[:, None, :]  # (new, 1, taps)
    half_width = (kernels.shape[-1] - orig) // 2
    n_strides = -(-n_out // new)
    total = (n_strides - 1) * orig + kernels.shape[-1]
    signal = audio.reshape(-1, 1, n_in).to(compute_dtype)
    signal = torch.nn.functional.pad(signal, (half_width, max(0, total - half_width - n_in)))
    phases = torch.nn.functional.conv1d(signal, kernels, stride=orig)  # (batch, new, n_strides)
    out = phases[:, :, :n_strides].transpose(1, 2).reshape(signal.shape[0], -1)[:, :n_out]
    return out.reshape(*leading, n_out).to(audio.dtype)
