"""Whisper's log-mel front end against transformers' WhisperFeatureExtractor and mel_filter_bank."""

import warnings

import numpy as np
import pytest
import torch

from dreidel.audio import N_FRAMES, N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram, mel_filters, pad_or_trim

audio_utils = pytest.importorskip("transformers.audio_utils")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers_slaney(n_mels):
    reference = audio_utils.mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                            max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney",
                                            mel_scale="slaney")
    ours = mel_filters(n_mels, dtype=torch.float64).numpy()
    assert ours.shape == (n_mels, 201)
    np.testing.assert_allclose(ours, reference.T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"sample_rate": 0}, ValueError, "sample_rate: expected an int >= 1, got 0"),  # used to give NaN filters
    ({"sample_rate": -16000}, ValueError, "sample_rate: expected an int >= 1, got -16000"),
    ({"sample_rate": 16000.0}, TypeError, "sample_rate: expected an int, got float"),
    ({"n_fft": 0}, ValueError, "n_fft: expected an int >= 2, got 0"),
    ({"n_mels": 0}, ValueError, "n_mels: expected an int >= 1, got 0"),
    ({"dtype": torch.int32}, TypeError, "dtype must be a floating torch.dtype"),
])
def test_mel_filters_refuses_bad_arguments_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        mel_filters(**kwargs)


def test_mel_filters_takes_numpy_ints():
    assert torch.equal(mel_filters(np.int64(80), sample_rate=np.int32(16000)), mel_filters(80))


def _speech():
    speech = pytest.importorskip("dreidel.data.speech")
    try:
        return speech.synthesize("The quick brown fox jumps over the lazy dog near the river bank.")
    except (ImportError, OSError) as error:
        pytest.skip(f"eSpeak NG unavailable: {error}")


def _noise():
    return (np.random.default_rng(0).standard_normal(SAMPLE_RATE * 7) * 0.1).astype(np.float32)


@pytest.mark.parametrize("make_audio", [_speech, _noise], ids=["speech", "noise"])
def test_matches_whisper_feature_extractor(make_audio):
    audio = make_audio()
    extractor = transformers.WhisperFeatureExtractor(feature_size=80)
    ours = log_mel_spectrogram(pad_or_trim(torch.from_numpy(audio))).numpy()
    assert ours.shape == (80, N_FRAMES) and ours.dtype == np.float32
    public = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    assert np.abs(ours - public).max() < 1e-4
    # the numpy path of transformers (float64 STFT) is independent of torch.stft
    numpy_path = extractor._np_extract_fbank_features(pad_or_trim(torch.from_numpy(audio)).numpy()[None], "cpu")[0]
    assert np.abs(ours - numpy_path).max() < 1e-4


def test_batch_matches_single_and_padding():
    audio = torch.from_numpy(_noise())
    batch = torch.stack([audio, 0.5 * audio.flip(0)])
    mels = log_mel_spectrogram(batch, padding=N_SAMPLES)
    assert mels.shape == (2, 80, (audio.shape[0] + N_SAMPLES) // 160)
    assert torch.allclose(mels[1], log_mel_spectrogram(0.5 * audio.flip(0), padding=N_SAMPLES), atol=1e-5)
    assert log_mel_spectrogram(pad_or_trim(audio)).shape == (80, N_FRAMES)


def test_pad_or_trim():
    audio = torch.arange(10.0)
    assert torch.equal(pad_or_trim(audio, 4), audio[:4])
    assert torch.equal(pad_or_trim(audio, 12)[10:], torch.zeros(2))
    assert pad_or_trim(torch.zeros(2, 5), 3).shape == (2, 3)


def test_silence_and_short_input():
    silent = log_mel_spectrogram(pad_or_trim(torch.zeros(0)))  # empty audio padded to 30 s of silence
    assert torch.all(silent == (-10.0 + 4.0) / 4.0)
    with pytest.raises(ValueError, match="at least 201"):
        log_mel_spectrogram(torch.zeros(200))
    with pytest.raises(TypeError, match="float"):
        log_mel_spectrogram(torch.zeros(1000, dtype=torch.int16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_sample_is_refused(bad):
    """One NaN or Inf sample used to make the whole spectrogram NaN, silently."""
    audio = torch.zeros(1600)
    audio[100] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        log_mel_spectrogram(audio)


def test_float64_audio_beyond_float32_is_named_as_such():
    with pytest.raises(ValueError, match="beyond float32's range"):
        log_mel_spectrogram(torch.full((1600,), 1e39, dtype=torch.float64))


@pytest.mark.parametrize("padding", [-1600, 1.5, True])
def test_a_bad_padding_is_refused(padding):
    """A negative padding used to trim the audio silently (90 frames of 100 for -1600)."""
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        log_mel_spectrogram(torch.zeros(16000), padding=padding)


def test_pad_or_trim_refuses_a_scalar_and_a_bad_length():
    with pytest.raises(ValueError, match=r"audio must have a samples axis \(\.\.\., samples\), got a scalar"):
        pad_or_trim(torch.tensor(1.0), 10)  # was IndexError
    with pytest.raises(ValueError, match="length: expected an int >= 0, got -1"):
        pad_or_trim(torch.zeros(4), -1)
    with pytest.raises(TypeError, match="length: expected an int, got float"):
        pad_or_trim(torch.zeros(4), 2.5)


def test_a_path_is_loaded_as_openai_whisper_does(tmp_path):
    """A str path raised a TypeError from numpy (audit); openai/whisper's log_mel_spectrogram takes one."""
    soundfile = pytest.importorskip("soundfile")
    from dreidel.audio import load_audio

    soundfile.write(tmp_path / "noise.wav", _noise()[:8000], SAMPLE_RATE, subtype="FLOAT")
    expected = log_mel_spectrogram(load_audio(tmp_path / "noise.wav"))
    for path in (str(tmp_path / "noise.wav"), tmp_path / "noise.wav"):
        assert torch.equal(log_mel_spectrogram(path), expected)
    with pytest.raises(ValueError, match="audio file not found"):
        log_mel_spectrogram(str(tmp_path / "missing.wav"))


def test_samples_whose_power_spectrum_overflows_are_refused():
    """Finite samples of 1e18 gave an all-NaN spectrogram without a word (a user audit)."""
    audio = torch.randn(16000, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="expected \\[-1, 1\\]"):
        assert torch.isfinite(log_mel_spectrogram(audio * 1e15)).all()
    with pytest.raises(ValueError, match=r"audio's samples \(up to .*e\+18\) are too large: .*overflows float32"), \
            pytest.warns(UserWarning, match="expected \\[-1, 1\\]"):
        log_mel_spectrogram(audio * 1e18)


def test_log_mel_takes_other_mel_counts_and_warns_of_empty_filters():
    """A converted checkpoint may have another count than Whisper's 80 or 128: computed the same way."""
    audio = 0.1 * torch.randn(16000, generator=torch.Generator().manual_seed(0))
    assert log_mel_spectrogram(audio, n_mels=64).shape == (64, 100)
    with pytest.warns(UserWarning, match="45 of 256 filters are empty"):
        log_mel_spectrogram(audio, n_mels=256)


def test_mel_filters_warn_of_empty_filters():
    """256 mels over the 201 bins of n_fft=400 leave 45 filters empty, whose channels would be constant."""
    with pytest.warns(UserWarning, match="45 of 256 filters are empty"):
        filters = mel_filters(256)
    assert int((filters.amax(dim=1) == 0).sum()) == 45
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mel_filters(128)


def test_log_mel_warns_of_samples_at_integer_scale():
    """int16 values given as floats: the mel moved by two decades and tiny.en heard other words, without a word
    of warning (load_audio warned of the same samples)."""
    audio = 0.3 * torch.sin(torch.arange(16000) * 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_mel_spectrogram(audio)
    with pytest.warns(UserWarning, match=r"log_mel_spectrogram: audio samples reach 9830.*divide by 32768"):
        log_mel_spectrogram(audio * 32768)


def test_mel_filters_refuse_a_rate_in_khz():
    with pytest.raises(ValueError, match=r"sample_rate: expected a rate in Hz .* got 16: in kHz\?"):
        mel_filters(sample_rate=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 80 mels up to 500 Hz leave filters empty: a warning of its own
        assert mel_filters(sample_rate=1000).shape == (80, 201)


def test_pad_or_trim_refuses_a_samples_channels_array():
    """A (16000, 2) stereo array was padded along its channels, to (16000, 480000): 30 GB."""
    with pytest.raises(ValueError, match=r"pad_or_trim: audio must be \(\.\.\., samples\), got shape \(16000, 2\)"):
        pad_or_trim(torch.zeros(16000, 2))
    # openai-whisper pads a mel of a few frames to 3000 with the same function; short batches pass too
    assert pad_or_trim(torch.zeros(80, 1), N_FRAMES).shape == (80, N_FRAMES)
    assert pad_or_trim(torch.zeros(1000, 10), 20).shape == (1000, 20)
