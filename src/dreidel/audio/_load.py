"""Audio input: files through libsndfile (``soundfile``), arrays and tensors; mono float32 at 16 kHz."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dreidel.audio._mel import SAMPLE_RATE
from dreidel.audio._resample import resample

__all__ = ["load_audio", "pcm_to_float"]

_MAX_CHANNELS = 16


def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM to float32 in [-1, 1): int16 / 2**15, int32 / 2**31, uint8 centred at 128; floats cast."""
    samples = np.asarray(samples)
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(samples.dtype, np.signedinteger):
        return (samples.astype(np.float64) / float(2 ** (8 * samples.dtype.itemsize - 1))).astype(np.float32)
    if np.issubdtype(samples.dtype, np.floating):
        return samples.astype(np.float32, copy=False)
    raise TypeError(f"audio samples must be integer PCM or floating point, got dtype {samples.dtype}")


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    if not path.is_file():
        raise ValueError(f"audio file not found: {path}")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    except RuntimeError as error:  # soundfile.LibsndfileError derives from it
        raise ValueError(f"{path}: not a readable audio file (expected WAV, FLAC, OGG/Vorbis, MP3 or another "
                         f"format libsndfile reads): {error}") from None
    return samples.T, int(rate)  # (channels, frames)


# The fastest rate of studio audio (DXD and 768 kHz PCM are the highest in use). A file's header can claim
# any rate up to 2^32 - 1, and the anti-aliasing filter for a rate far above 16 kHz is as long as the ratio.
MAX_SAMPLE_RATE = 768_000
# Half the slowest rate speech is stored at (8 kHz telephony). Below it the 16 kHz output would be many
# times the input: an 8 KB file whose header claims 1 Hz became 64 million samples (1.1 hours of audio).
MIN_SAMPLE_RATE = 4_000


def load_audio(path_or_array, sample_rate: int | None = None) -> torch.Tensor:
    """Load audio as mono float32 at 16 kHz.

    Args:
        path_or_array: an audio file path (any format libsndfile reads; the file's rate is used), or samples as
            a numpy array / torch tensor of shape ``(samples,)`` or ``(channels, samples)``; integer PCM is
            scaled to [-1, 1).
        sample_rate: rate of the given array in Hz (``None``: already 16 kHz). Must be ``None`` for a file.

    Returns:
        float32 tensor ``(samples,)`` at 16 kHz: channels averaged, resampled with a band-limited
        windowed-sinc filter. Empty input gives an empty tensor (zero samples), not an error; Whisper pads
        it to a silent 30 s window.

    Raises:
        ValueError: missing or unreadable file (naming the path), bad shape, non-finite samples, a rate that is
            not an integer from ``MIN_SAMPLE_RATE`` (4 kHz) to ``MAX_SAMPLE_RATE`` (768 kHz), or one above
            about 660 kHz sharing so few factors with 16 kHz that its filter table would take hundreds of MB
            (see ``resample``; every rate audio is recorded at, 768 kHz included, shares many).
    """
    where = f"{path_or_array}: " if isinstance(path_or_array, (str, os.PathLike)) else ""  # names a file in errors
    if isinstance(path_or_array, (str, os.PathLike)):
        if sample_rate is not None:
            raise ValueError(f"sample_rate must be None for a file (its rate is read from {path_or_array})")
        samples, rate = _read_file(Path(path_or_array))
        waveform = torch.from_numpy(np.ascontiguousarray(samples))
    elif isinstance(path_or_array, (np.ndarray, torch.Tensor)):
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
        if isinstance(path_or_array, torch.Tensor):
            tensor = path_or_array.detach().cpu()
            waveform = tensor.to(torch.float32) if tensor.is_floating_point() else \
                torch.from_numpy(pcm_to_float(tensor.numpy()))
        else:
            waveform = torch.from_numpy(np.ascontiguousarray(pcm_to_float(path_or_array)))
        if waveform.dim() not in (1, 2):
            raise ValueError(f"audio array must be (samples,) or (channels, samples), got shape {tuple(waveform.shape)}")
        if waveform.dim() == 2 and waveform.shape[0] > _MAX_CHANNELS:
            raise ValueError(f"audio array must be (channels, samples) with at most {_MAX_CHANNELS} channels, got "
                             f"shape {tuple(waveform.shape)}; transpose a (samples, channels) array")
    else:
        raise TypeError(f"path_or_array must be a path, numpy array or torch tensor, got {type(path_or_array).__name__}")
    integer = isinstance(rate, (int, np.integer)) and not isinstance(rate, bool)
    if not integer or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{where}sample rate must be an integer number of Hz from {MIN_SAMPLE_RATE} (half the "
                         f"telephone rate) to {MAX_SAMPLE_RATE} (the highest rate audio is recorded at), got {rate!r}")
    if waveform.dim() == 2:
        waveform = waveform.mean(dim=0)
    if not torch.isfinite(waveform).all():
        raise ValueError(f"{where}audio contains NaN or infinite samples")
    try:
        return resample(waveform.to(torch.float32), int(rate), SAMPLE_RATE).contiguous()
    except ValueError as error:  # a rate sharing too few factors with 16 kHz (see resample)
        raise ValueError(f"{where}{error}") from None
