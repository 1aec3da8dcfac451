"""Whisper's log-mel front end: 25 ms Hann frames every 10 ms at 16 kHz, power spectrum, Slaney mel filters,
log10 clamped to 8 decades below the maximum, scaled by (x + 4) / 4 (Radford et al. 2022, arXiv:2212.04356).

The Slaney mel scale (Slaney, "Auditory Toolbox", 1998; as in librosa with ``htk=False, norm="slaney"``) is
linear below 1 kHz (3 mels per 200 Hz) and logarithmic above; each triangle is scaled to unit area.
"""

from __future__ import annotations

import numbers
import os
from functools import lru_cache

import numpy as np
import torch

from dreidel._checks import check_count
from dreidel._warnings import warn

__all__ = [
    "SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_LENGTH", "N_SAMPLES", "N_FRAMES",
    "mel_filters", "log_mel_spectrogram", "pad_or_trim", "hz_to_mel", "mel_to_hz",
    # for the package's own modules (load_audio, resample, transcribe)
    "MAX_CHANNELS", "FLOAT_PEAK_WARNING", "check_samples_last", "log_mel_of_samples", "warn_beyond_full_scale",
]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30  # seconds per Whisper window
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000

# The lowest rate mel_filters takes: rates of audio are thousands of Hz, and one below it is most likely a rate
# in kHz (16 for 16 kHz), whose filters would span 0 to 8 Hz.
_MIN_FILTER_RATE = 1000
# Float samples beyond this magnitude are not audio in [-1, 1]: most likely integer PCM values given as floats.
FLOAT_PEAK_WARNING = 1.5
# The most channels audio has: load_audio refuses a (channels, samples) array with more, and a last axis this
# short beside one at least _SAMPLES_LAST_RATIO times longer and _SAMPLES_LAST_MIN long (a quarter second at 16
# kHz) is taken for (samples, channels) (check_samples_last): a mel of a few frames, (80, 1), is not.
MAX_CHANNELS = 16
_SAMPLES_LAST_RATIO = 64
_SAMPLES_LAST_MIN = 4000

_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL  # 15
_LOG_STEP = np.log(6.4) / 27.0  # 27 mels per factor 6.4 in frequency


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel of frequencies in Hz (float64)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP
    return np.where(hz >= _LOG_START_HZ, logarithmic, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel` (float64)."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _LINEAR_HZ_PER_MEL
    logarithmic = _LOG_START_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _LOG_START_MEL) - _LOG_START_MEL))
    return np.where(mel >= _LOG_START_MEL, logarithmic, linear)


@lru_cache(maxsize=8)
def _mel_filters_float64(n_mels: int, sample_rate: int, n_fft: int) -> np.ndarray:
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), n_mels + 2))
    widths = np.diff(edges_hz)  # (n_mels + 1,)
    offsets = edges_hz[:, None] - fft_hz[None, :]  # (n_mels + 2, n_freqs)
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return triangles * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # unit area ("slaney" norm)


def mel_filters(n_mels: int = 80, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Slaney mel filterbank ``(n_mels, n_fft // 2 + 1)`` from 0 Hz to Nyquist.

    Raises ``TypeError`` / ``ValueError`` naming the argument unless ``n_mels`` is an int >= 1,
    ``sample_rate`` an int >= 1000 (Hz: a rate in kHz is refused), ``n_fft`` an int >= 2 (a 0 Hz and a
    Nyquist bin) and ``dtype`` a floating torch dtype. Warns where some filters are empty (too many mels for
    the FFT's bins, e.g. 256 at ``n_fft=400``: their channels would be constant), as librosa does.
    """
    check_count("n_mels", n_mels)
    check_count("sample_rate", sample_rate)
    if sample_rate < _MIN_FILTER_RATE:
        raise ValueError(f"sample_rate: expected a rate in Hz (16000 for Whisper), at least {_MIN_FILTER_RATE}; got "
                         f"{sample_rate}: in kHz?")
    check_count("n_fft", n_fft, minimum=2)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    filters = _mel_filters_float64(int(n_mels), int(sample_rate), int(n_fft))
    empty = int((filters.max(axis=1) == 0).sum())
    if empty:
        warn(f"mel_filters: {empty} of {n_mels} filters are empty (no FFT bin of n_fft={n_fft} falls "
             "inside them): fewer mels, or a larger n_fft")
    return torch.from_numpy(filters).to(dtype)


def warn_beyond_full_scale(samples: torch.Tensor | np.ndarray, what: str, guess: str) -> None:
    """Warn where float ``samples`` pass ``FLOAT_PEAK_WARNING`` in magnitude (``what`` reach ..., ``guess``)."""
    if isinstance(samples, torch.Tensor):
        peak = float(samples.abs().max()) if samples.numel() else 0.0
    else:
        peak = float(np.abs(samples).max()) if samples.size else 0.0
    if peak > FLOAT_PEAK_WARNING:
        warn(f"{what} reach {peak:g}, expected [-1, 1]: {guess}")


def check_samples_last(audio: torch.Tensor, function: str) -> None:
    """``ValueError`` where ``audio``, expected as ``(..., samples)``, looks like a ``(samples, channels)`` array:
    a last axis of at most ``MAX_CHANNELS`` beside one at least ``_SAMPLES_LAST_RATIO`` times as long and
    ``_SAMPLES_LAST_MIN`` long (a stereo file read by soundfile or scipy is ``(samples, 2)``; taken as 2
    samples per row, it was resampled across its channels, or padded to 30 s per sample)."""
    samples = audio.shape[-1]
    rows = audio.shape[-2] if audio.dim() >= 2 else 0
    if 0 < samples <= MAX_CHANNELS and rows >= max(_SAMPLES_LAST_RATIO * samples, _SAMPLES_LAST_MIN):
        raise ValueError(f"{function}: audio must be (..., samples), got shape {tuple(audio.shape)}, which looks like "
                         "(samples, channels): pass audio.T (or audio.mT), or load it with load_audio")


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pad or cut the last axis of ``audio`` (..., samples) to ``length`` samples.

    Raises:
        ValueError: ``audio`` is a scalar (no samples axis) or looks like a ``(samples, channels)`` array (a
            last axis of at most 16 beside one of 4000 or more, 64 times as long: pass ``audio.T``), or
            ``length`` is negative.
        TypeError: ``length`` is not an int.
    """
    if not isinstance(audio, torch.Tensor):
        audio = torch.as_tensor(np.asarray(audio))
    if audio.dim() == 0:
        raise ValueError("audio must have a samples axis (..., samples), got a scalar")
    check_samples_last(audio, "pad_or_trim")
    check_count("length", length, minimum=0)
    if audio.shape[-1] >= length:
        return audio[..., :length]
    return torch.nn.functional.pad(audio, (0, length - audio.shape[-1]))


def log_mel_spectrogram(audio, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """Whisper's normalised log-mel spectrogram.

    Args:
        audio: 16 kHz float waveform ``(..., samples)`` (tensor or array), or the path of an audio file, read with
            :func:`dreidel.audio.load_audio` (as openai/whisper's ``log_mel_spectrogram`` takes one).
        n_mels: 80 (Whisper up to large-v2) or 128 (large-v3); another count (a converted checkpoint's) is
            computed the same way, with ``mel_filters``' warning where some filters would be empty.
        padding: zeros appended before the transform (Whisper's transcribe pads by ``N_SAMPLES``).

    Returns:
        float32 ``(..., n_mels, (samples + padding) // 160)``; 3000 frames for 30 s. The clamp to ``max - 8``
        uses each example's own maximum.

    Raises:
        ValueError: fewer than 201 samples after padding (the centred 400-point frame needs them), a NaN or
            infinite sample, or samples so large that their power spectrum overflows float32 (about 1e17 and
            more); for a path, what ``load_audio`` raises. ``n_mels`` as for ``mel_filters``.
        TypeError: samples that are not floating point.
    """
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral) or padding < 0:
        raise ValueError(f"padding must be an int >= 0 (zeros appended), got {padding!r}")  # -k trimmed silently
    from_file = isinstance(audio, (str, os.PathLike))
    if from_file:
        from dreidel.audio._load import load_audio  # here: _load imports this module

        audio = load_audio(audio)  # which warns of a float file's samples beyond [-1, 1]
    if not isinstance(audio, torch.Tensor):
        audio = torch.as_tensor(np.asarray(audio))
    if not audio.is_floating_point():
        raise TypeError(f"audio must hold float samples in [-1, 1], got dtype {audio.dtype} (use load_audio)")
    if audio.dim() == 0:
        raise ValueError("audio must have a samples axis, got a scalar")
    samples = audio.to(torch.float32)
    if not bool(torch.isfinite(samples).all()):  # one NaN or Inf sample would make every value NaN
        # which one, looked up only on failure: a float64 sample past float32's range is finite until the cast
        raise ValueError("audio has NaN or infinite samples" if not bool(torch.isfinite(audio).all())
                         else "audio has samples beyond float32's range")
    if not from_file:
        warn_beyond_full_scale(samples, "log_mel_spectrogram: audio samples",
                               "integer PCM values given as floats? (int16: divide by 32768)")
    return log_mel_of_samples(samples, n_mels, padding)


def log_mel_of_samples(audio: torch.Tensor, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """``log_mel_spectrogram`` of finite float32 ``audio`` (..., samples) already checked, as ``load_audio``'s
    are: no check of their level (``transcribe`` warns once per input, where this runs once per window)."""
    if padding:
        audio = torch.nn.functional.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(f"audio has {audio.shape[-1]} samples after padding; log_mel_spectrogram needs at least "
                         f"{N_FFT // 2 + 1} (pad it, e.g. with pad_or_trim)")
    leading = audio.shape[:-1]
    window = torch.hann_window(N_FFT, device=audio.device)
    spectrum = torch.stft(audio.reshape(-1, audio.shape[-1]), N_FFT, HOP_LENGTH, window=window,
                          center=True, pad_mode="reflect", return_complex=True)  # (B, 201, frames + 1)
    power = spectrum[..., :-1].abs() ** 2  # Whisper drops the last frame
    mel = mel_filters(n_mels).to(audio.device) @ power  # (B, n_mels, frames)
    if not bool(torch.isfinite(mel).all()):  # finite samples whose squares pass float32's range: all NaN below
        raise ValueError(f"audio's samples (up to {float(audio.abs().max()):.3g}) are too large: their power "
                         "spectrum overflows float32; scale them to [-1, 1]")
    log_mel = torch.clamp(mel, min=1e-10).log10()
    peak = log_mel.amax(dim=(-2, -1), keepdim=True)
    log_mel = torch.maximum(log_mel, peak - 8.0)
    return ((log_mel + 4.0) / 4.0).reshape(*leading, n_mels, -1)
