"""Band-limited resampling by a polyphase windowed-sinc filter, in PyTorch.

A rational rate change ``new/orig`` (reduced by their gcd) places output sample ``k = q*new + i`` at input
position ``q*orig + i*orig/new``; each phase ``i`` is one FIR kernel, so all phases run as a single strided
``conv1d`` with ``new`` output channels. The kernel is an ideal low-pass (sinc) at ``rolloff`` times the lower
Nyquist frequency, truncated to ``zero_crossings`` zero crossings on each side and tapered by a Kaiser window
(Smith, "Digital Audio Resampling", CCRMA 2002; Kaiser & Schafer 1980 for the window).

A polyphase kernel has ``orig + 2·half_width`` taps per phase, mostly zeros, and ``new`` phases, so rates whose
reduced ratio is large (44056 -> 16000 is 5507/2000, 22254 -> 16000 is 11127/8000) would need a table of
hundreds of MB to GB and as many multiply-adds per sample. Those ratios evaluate the same kernel directly at each
output's exact input position instead: ``2·half_width + 2`` taps per output sample, in chunks.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from dreidel._checks import check_count, check_number
from dreidel.audio._mel import check_samples_last

__all__ = ["resample"]


def _filter_size(orig: int, new: int, zero_crossings: int, rolloff: float) -> tuple[float, int]:
    """``(cutoff, half_width)``: the low-pass cutoff in cycles per input sample, and the kernel's half width in
    input samples (``zero_crossings`` zero crossings of the sinc)."""
    cutoff = 0.5 * min(orig, new) / orig * rolloff
    return cutoff, math.ceil(zero_crossings / (2.0 * cutoff))


def _windowed_sinc(distance: np.ndarray, cutoff: float, half_width: int, kaiser_beta: float) -> np.ndarray:
    """The kernel at ``distance`` (output time minus input time, input samples): sinc low-pass, Kaiser window."""
    inside = np.abs(distance) <= half_width
    window = np.where(inside, np.i0(kaiser_beta * np.sqrt(np.clip(1.0 - (distance / half_width) ** 2, 0.0, 1.0)))
                      / np.i0(kaiser_beta), 0.0)
    return 2.0 * cutoff * np.sinc(2.0 * cutoff * distance) * window


_KERNEL_ROWS_PER_STEP = 512  # phases evaluated at once: np.i0's temporaries stay a few MB


def _kernel_table(phase_offsets: np.ndarray, taps: int, cutoff: float, half_width: int,
                  kaiser_beta: float) -> np.ndarray:
    """(phases, taps) float64: ``_windowed_sinc`` at ``phase_offsets[i] + half_width - j``, filled a block of
    phases at a time (evaluated whole, the window's temporaries took several times the table's size)."""
    table = np.empty((phase_offsets.shape[0], taps))
    tap_index = np.arange(taps)[None, :]
    for start in range(0, phase_offsets.shape[0], _KERNEL_ROWS_PER_STEP):
        rows = phase_offsets[start:start + _KERNEL_ROWS_PER_STEP, None]
        table[start:start + rows.shape[0]] = _windowed_sinc(rows + half_width - tap_index, cutoff, half_width,
                                                            kaiser_beta)
    return table


@lru_cache(maxsize=16)
def _polyphase_kernels(orig: int, new: int, zero_crossings: int, rolloff: float, kaiser_beta: float) -> np.ndarray:
    """(new, taps) float64 kernels; tap ``j`` of phase ``i`` multiplies input ``q*orig + j - half_width``."""
    cutoff, half_width = _filter_size(orig, new, zero_crossings, rolloff)
    phase_offsets = np.arange(new) * orig / new  # output position inside the stride, input units
    return _kernel_table(phase_offsets, 2 * half_width + orig, cutoff, half_width, kaiser_beta)


_MAX_POLYPHASE_TABLE = 1 << 20  # kernel entries (new x taps); beyond it the direct path is cheaper and small
# Values gathered per step of the direct path (batch x outputs x taps): 16 MB of float32 (a fixed 32768 outputs
# per step took 1.85 GB for 16 channels at 192001 Hz, 612 taps)
_DIRECT_STEP_VALUES = 1 << 22
# Kernel entries of the direct path (256 MB of float64): 768 kHz -> 16 kHz needs 1 x 2440; the coprime
# 192001 -> 16000 Hz, 16000 x 612.
_MAX_DIRECT_TABLE = 1 << 25
# Direct tables up to this many entries (8 MB) are kept for the next call; larger ones (an odd rate such as
# 600001 Hz: 244 MB) are built per call: sixteen of them kept by the cache held about 4 GB for good.
_MAX_CACHED_DIRECT_TABLE = 1 << 20


def _direct_kernel_table(orig: int, new: int, zero_crossings: int, rolloff: float, kaiser_beta: float) -> np.ndarray:
    """(new, 2·half_width + 2) float64: for phase ``i`` (output k with k·orig ≡ i·orig mod new), tap ``j``
    multiplies input ``floor(k·orig/new) - half_width + j``; the same windowed sinc as ``_polyphase_kernels``."""
    cutoff, half_width = _filter_size(orig, new, zero_crossings, rolloff)
    fraction = (np.arange(new) * orig % new) / new  # (new,) position of the output past its input sample
    return _kernel_table(fraction, 2 * half_width + 2, cutoff, half_width, kaiser_beta)


_cached_direct_kernel_table = lru_cache(maxsize=16)(_direct_kernel_table)


def _direct_kernels(orig: int, new: int, zero_crossings: int, rolloff: float, kaiser_beta: float) -> np.ndarray:
    """``_direct_kernel_table``, from a cache where it is small (``_MAX_CACHED_DIRECT_TABLE``)."""
    half_width = _filter_size(orig, new, zero_crossings, rolloff)[1]
    small = new * (2 * half_width + 2) <= _MAX_CACHED_DIRECT_TABLE
    build = _cached_direct_kernel_table if small else _direct_kernel_table
    return build(orig, new, zero_crossings, rolloff, kaiser_beta)


def _resample_direct(signal: torch.Tensor, orig: int, new: int, n_out: int, kernels: torch.Tensor) -> torch.Tensor:
    """signal (batch, n_in) -> (batch, n_out) with ``kernels`` from ``_direct_kernels`` (new, taps).

    Output ``k`` lies at input position ``k·orig/new`` (integer part and phase computed exactly in int64) and
    takes the ``taps`` inputs around it; the signal is zero beyond its ends.
    """
    batch, n_in = signal.shape
    taps = kernels.shape[1]
    half_width = (taps - 2) // 2
    offsets = torch.arange(taps, device=signal.device)  # (taps,)
    padded = torch.nn.functional.pad(signal, (half_width, half_width + 2))  # input i sits at i + half_width
    out = signal.new_empty(batch, n_out)
    step = max(1, _DIRECT_STEP_VALUES // (batch * taps))
    for start in range(0, n_out, step):
        k = torch.arange(start, min(start + step, n_out), device=signal.device)  # (K,) int64
        base = k * orig // new
        gathered = padded[:, base[:, None] + offsets[None, :]]  # (batch, K, taps)
        out[:, start:start + k.shape[0]] = (gathered * kernels[k % new]).sum(-1)
    return out


def resample(audio: torch.Tensor, orig_rate: int, new_rate: int, *, zero_crossings: int = 24,
             rolloff: float = 0.945, kaiser_beta: float = 8.6) -> torch.Tensor:
    """Resample ``audio`` of shape ``(..., samples)`` from ``orig_rate`` to ``new_rate`` Hz.

    Returns ``(..., ceil(samples * new_rate / orig_rate))`` in the input's floating dtype. The low-pass is -6 dB
    at ``rolloff`` times the lower Nyquist frequency and reaches its stop band (about -85 dB with the default
    Kaiser beta) a little above that Nyquist: to 16 kHz with the defaults, 7.0 kHz passes at -0.2 dB, 7.56 kHz at
    -6 dB, and 8.1-8.4 kHz, just past the Nyquist, fold back attenuated by 31-75 dB (measured from 22.05, 44.1 and
    48 kHz); from 8.6 kHz on, by 85 dB or more. The signal is taken as zero outside its ends. Raises
    ``ValueError`` where the reduced ratio would need a filter table of more than 2^25 values (about 256 MB), e.g.
    a rate above about 660 kHz coprime with the other, or where ``audio`` looks like ``(samples, channels)`` (a
    last axis of at most 16 beside one of 4000 or more, 64 times as long: pass ``audio.T``); ``TypeError`` for
    samples that are not floating point (integer PCM goes through ``pcm_to_float`` first), and ``TypeError`` /
    ``ValueError`` naming the argument unless ``zero_crossings`` is an int >= 1, ``rolloff`` a number in (0, 1]
    (above 1 the filter would let aliases through) and ``kaiser_beta`` a finite number >= 0.
    """
    if not isinstance(audio, torch.Tensor):
        raise TypeError(f"audio must be a torch.Tensor, got {type(audio).__name__}")
    if not audio.is_floating_point():
        pcm = not (audio.is_complex() or audio.dtype == torch.bool)
        hint = " (integer PCM: torch.from_numpy(dreidel.audio.pcm_to_float(audio.numpy())) scales it)" if pcm else ""
        raise TypeError(f"audio must hold floating-point samples, got {audio.dtype}{hint}")
    if audio.dim() == 0:
        raise ValueError("audio must have a samples axis (..., samples), got a scalar")
    check_samples_last(audio, "resample")
    check_count("zero_crossings", zero_crossings)
    check_number("rolloff", rolloff, low=0, high=1, low_open=True)
    check_number("kaiser_beta", kaiser_beta, low=0)
    zero_crossings, rolloff, kaiser_beta = int(zero_crossings), float(rolloff), float(kaiser_beta)  # cache keys
    for name, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if not isinstance(rate, (int, np.integer)) or isinstance(rate, bool) or rate <= 0:
            raise ValueError(f"{name} must be a positive integer number of Hz, got {rate!r}")
    if orig_rate == new_rate:
        return audio.clone()
    divisor = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // divisor, int(new_rate) // divisor
    n_in = audio.shape[-1]
    n_out = -(-n_in * new // orig)  # ceil
    leading = audio.shape[:-1]
    if audio.numel() == 0:  # no samples, or no channels (a (0, n) batch)
        return audio.new_zeros(*leading, n_out)
    compute_dtype = torch.float64 if audio.dtype == torch.float64 else torch.float32
    half_width = _filter_size(orig, new, zero_crossings, rolloff)[1]
    if new * (2 * half_width + 2) > _MAX_DIRECT_TABLE:
        raise ValueError(f"resampling {orig_rate} Hz to {new_rate} Hz needs {new} filter phases of "
                         f"{2 * half_width + 2} taps each (more than {_MAX_DIRECT_TABLE} kernel values); "
                         f"rates this far apart, sharing so few factors, are not supported")
    if new * (2 * half_width + orig) > _MAX_POLYPHASE_TABLE:
        kernels = torch.from_numpy(_direct_kernels(orig, new, zero_crossings, rolloff, kaiser_beta))
        signal = audio.reshape(-1, n_in).to(compute_dtype)
        out = _resample_direct(signal, orig, new, n_out, kernels.to(device=audio.device, dtype=compute_dtype))
        return out.reshape(*leading, n_out).to(audio.dtype)
    kernels = torch.from_numpy(_polyphase_kernels(orig, new, zero_crossings, rolloff, kaiser_beta))
    kernels = kernels.to(device=audio.device, dtype=compute_dtype)[:, None, :]  # (new, 1, 2·half_width + orig)
    n_strides = -(-n_out // new)
    total = (n_strides - 1) * orig + kernels.shape[-1]
    signal = audio.reshape(-1, 1, n_in).to(compute_dtype)
    signal = torch.nn.functional.pad(signal, (half_width, max(0, total - half_width - n_in)))
    phases = torch.nn.functional.conv1d(signal, kernels, stride=orig)  # (batch, new, n_strides)
    out = phases[:, :, :n_strides].transpose(1, 2).reshape(signal.shape[0], -1)[:, :n_out]
    return out.reshape(*leading, n_out).to(audio.dtype)
