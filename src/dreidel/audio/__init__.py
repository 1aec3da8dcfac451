"""dreidel.audio: audio loading, band-limited resampling and Whisper's log-mel front end."""

from dreidel.audio._load import load_audio, pcm_to_float
from dreidel.audio._mel import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    hz_to_mel,
    log_mel_spectrogram,
    mel_filters,
    mel_to_hz,
    pad_or_trim,
)
from dreidel.audio._resample import resample

__all__ = [
    "CHUNK_LENGTH",
    "HOP_LENGTH",
    "N_FFT",
    "N_FRAMES",
    "N_SAMPLES",
    "SAMPLE_RATE",
    "hz_to_mel",
    "load_audio",
    "log_mel_spectrogram",
    "mel_filters",
    "mel_to_hz",
    "pad_or_trim",
    "pcm_to_float",
    "resample",
]
