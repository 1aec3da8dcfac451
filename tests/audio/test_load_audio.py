"""load_audio: files through soundfile, PCM scaling, channel mixing, resampling, clear errors."""

import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dreidel.audio import SAMPLE_RATE, load_audio, resample

soundfile = pytest.importorskip("soundfile")
scipy_signal = pytest.importorskip("scipy.signal")


def _tone(rate, seconds=0.5, freq=440.0):
    return np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def test_stereo_44k_int16_file(tmp_path):
    left, right = 0.5 * _tone(44100), 0.25 * _tone(44100, freq=1000.0)
    pcm = np.round(np.stack([left, right], axis=1) * 32767).astype(np.int16)  # (frames, channels)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, pcm, 44100, subtype="PCM_16")
    audio = load_audio(path)
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert audio.shape[0] == math.ceil(pcm.shape[0] * SAMPLE_RATE / 44100)
    mono = pcm.astype(np.float64).mean(axis=1) / 32768.0
    reference = scipy_signal.resample_poly(mono, 160, 441)
    assert np.abs(audio.numpy() - reference)[800:-800].max() < 1e-2
    expected = 0.5 * (0.5 * _tone(SAMPLE_RATE) + 0.25 * _tone(SAMPLE_RATE, freq=1000.0))
    assert np.abs(audio.numpy() - expected[: audio.shape[0]])[800:-800].max() < 2e-3  # int16 rounding


def test_8k_array_and_file_agree(tmp_path):
    tone = (0.3 * _tone(8000)).astype(np.float32)
    path = tmp_path / "narrow.flac"
    soundfile.write(path, tone, 8000, subtype="PCM_24")
    from_file = load_audio(path)
    from_array = load_audio(tone, sample_rate=8000)
    assert from_array.shape == (tone.shape[0] * 2,)
    assert torch.allclose(from_file, from_array, atol=1e-6)
    expected = 0.3 * _tone(SAMPLE_RATE)
    assert np.abs(from_array.numpy() - expected)[400:-400].max() < 1e-3


@pytest.mark.parametrize("dtype, scale", [(np.int16, 2**15), (np.int32, 2**31), (np.float64, 1.0)])
def test_array_dtypes_and_channels_first(dtype, scale):
    tone = _tone(SAMPLE_RATE) * 0.5
    samples = (tone * scale).astype(dtype) if scale != 1.0 else tone.astype(dtype)
    stereo = np.stack([samples, samples])
    audio = load_audio(stereo)
    assert audio.dtype == torch.float32
    assert np.abs(audio.numpy() - tone).max() < 1e-4
    assert torch.equal(load_audio(torch.from_numpy(stereo)), audio)


def test_empty_audio_is_an_empty_tensor(tmp_path):
    assert load_audio(np.zeros(0, dtype=np.float32)).shape == (0,)
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, dtype=np.int16), 22050)
    assert load_audio(path).shape == (0,)


def test_non_audio_file(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("these are not samples")
    with pytest.raises(ValueError, match=r"notes\.wav.*not a readable audio file"):
        load_audio(path)
    with pytest.raises(ValueError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path))} is a directory; expected an audio file$"):  # was "not found"
        load_audio(tmp_path)


def test_big_endian_pcm_is_pcm():
    """'>i2' was refused as 'must be integer PCM (int8, int16, ...)'."""
    pcm = np.array([1000, -1000, 32767, -32768] * 100, dtype=np.int16)
    assert torch.equal(load_audio(pcm.astype(">i2")), load_audio(pcm))


@pytest.mark.parametrize("bad, kwargs, error, message", [
    (np.zeros((2, 3, 4), dtype=np.float32), {}, ValueError, "shape"),
    (np.zeros((16000, 2), dtype=np.float32), {}, ValueError, "transpose"),
    (np.array([0.0, np.nan], dtype=np.float32), {}, ValueError, "NaN"),
    (np.zeros((0, 100), dtype=np.float32), {}, ValueError, r"no channels: shape \(0, 100\)"),  # was "NaN"
    (torch.zeros(0, 100), {}, ValueError, r"no channels: shape \(0, 100\)"),
    (np.array(0.3, dtype=np.float32), {}, ValueError, "got a 0-d array"),  # was one sample (a user audit)
    (torch.tensor(0.3), {}, ValueError, "got a 0-d array"),
    (np.zeros(10, dtype=np.float32), {"sample_rate": 0}, ValueError, "sample rate must be an integer .* from 4000"),
    (np.zeros(10, dtype=np.float32), {"sample_rate": 3999}, ValueError, "from 4000 .* got 3999"),
    (np.zeros(10, dtype=np.float32), {"sample_rate": 768_001}, ValueError, "to 768000"),
    (np.zeros(10, dtype=bool), {}, TypeError, "dtype"),
    ([0.0, 1.0], {}, TypeError, "path_or_array"),
])
def test_bad_arrays(bad, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_audio(bad, **kwargs)


def test_sample_rate_with_file(tmp_path):
    path = tmp_path / "a.wav"
    soundfile.write(path, np.zeros(100, dtype=np.int16), 16000)
    with pytest.raises(ValueError, match="sample_rate must be None"):
        load_audio(path, sample_rate=8000)


def test_resample_is_used_for_arrays():
    tone = torch.from_numpy(_tone(22050).astype(np.float32))
    assert torch.equal(load_audio(tone, sample_rate=22050), resample(tone, 22050, SAMPLE_RATE))


def test_non_finite_samples_in_a_file_name_the_file(tmp_path):
    import soundfile

    samples = np.zeros(1600, dtype=np.float32)
    samples[10] = np.nan
    soundfile.write(tmp_path / "nan.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN or infinite") as raised:
        load_audio(tmp_path / "nan.wav")
    assert str(tmp_path / "nan.wav") in str(raised.value)


def test_a_header_claiming_an_absurd_rate_is_refused_before_resampling(tmp_path):
    path = tmp_path / "fast.wav"
    soundfile.write(path, np.zeros(1600, dtype=np.int16), 16000)
    header = bytearray(path.read_bytes())
    header[24:28] = (2**31 - 1).to_bytes(4, "little")  # the fmt chunk's sample rate
    path.write_bytes(bytes(header))
    with pytest.raises(ValueError, match="sample rate must be .* to 768000.*got 2147483647") as raised:
        load_audio(path)
    assert str(path) in str(raised.value)


def test_a_header_claiming_a_rate_of_one_hertz_is_refused_before_resampling(tmp_path):
    # 4000 samples at "1 Hz" would have become 64 million at 16 kHz (1.1 hours, 256 MB) from an 8 KB file.
    path = tmp_path / "slow.wav"
    soundfile.write(path, np.zeros(4000, dtype=np.int16), 1, subtype="PCM_16")
    with pytest.raises(ValueError, match="from 4000 .*got 1$") as raised:
        load_audio(path)
    assert str(path) in str(raised.value)


def test_the_lowest_and_highest_rates_load():
    assert load_audio(np.zeros(400, dtype=np.float32), sample_rate=4_000).shape == (1600,)
    assert load_audio(np.zeros(76_800, dtype=np.float32), sample_rate=768_000).shape == (1600,)


def test_a_rate_needing_a_huge_filter_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "odd.wav"
    soundfile.write(path, np.zeros(767_999 // 10, dtype=np.int16), 767_999)
    with pytest.raises(ValueError, match="needs 16000 filter phases") as raised:
        load_audio(path)
    assert str(raised.value).startswith(str(path))


def test_int64_samples_are_refused_with_the_fix():
    """torch.tensor of Python ints is int64, no PCM format: scaled by 2**63, int16 values became 1e-15 (a
    transcript of "you")."""
    with pytest.raises(TypeError, match="int64 is no PCM format.*int16"):
        load_audio(torch.tensor([0, 1200, -3400, 25000] * 400))


def test_float_samples_at_integer_scale_warn():
    """int16 values given as floats read as loud noise; they warn (audio in [-1, 1] does not)."""
    loud = np.array([0.0, 25901.0, -1200.0] * 1000, dtype=np.float32)
    for samples in (loud, torch.from_numpy(loud), torch.from_numpy(loud).double()):  # a tensor skipped the check
        with pytest.warns(UserWarning, match=r"float samples reach 25901, expected \[-1, 1\].*divide by 32768"):
            load_audio(samples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_audio(np.array([0.0, 0.9, -1.0] * 1000, dtype=np.float32))


def _wav_bytes(tmp_path, samples: int, **kwargs) -> bytes:
    soundfile.write(tmp_path / "whole.wav", np.zeros(samples, dtype=np.int16), SAMPLE_RATE, **kwargs)
    return (tmp_path / "whole.wav").read_bytes()


@pytest.mark.parametrize("kept", [0.1, 0.999])
def test_a_truncated_wav_file_is_refused_naming_it(tmp_path, kept):
    """libsndfile read a WAV file cut short (a broken download) up to its end, without a word."""
    whole = _wav_bytes(tmp_path, 16000)
    path = tmp_path / "cut.wav"
    path.write_bytes(whole[:int(len(whole) * kept)])
    with pytest.raises(ValueError, match=r"truncated WAV file: its data chunk declares 32000 bytes of audio, the "
                                         r"file holds \d+") as raised:
        load_audio(path)
    assert str(raised.value).startswith(str(path))


@pytest.mark.parametrize("container, suffix, kind, bytes_per_sample", [
    ("RF64", "wav", "RF64", 2), ("W64", "w64", "Wave64", 2), ("AIFF", "aiff", "AIFF", 2)])
def test_truncated_rf64_wave64_and_aiff_files_are_refused_like_wav(tmp_path, container, suffix, kind,
                                                                   bytes_per_sample):
    """Only RIFF WAV files were checked: the others loaded cut short without a word (review)."""
    tone = (0.3 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    whole_path = tmp_path / f"whole.{suffix}"
    soundfile.write(whole_path, tone, SAMPLE_RATE, format=container, subtype="PCM_16")
    np.testing.assert_allclose(load_audio(whole_path).numpy(), tone, atol=1e-4)  # a whole file loads
    whole = whole_path.read_bytes()
    for kept, message in [(len(whole) // 2, rf"truncated {kind} file: its header declares "
                                             rf"{16000 * bytes_per_sample} bytes of audio, the file holds \d+"),
                          (30, rf"truncated {kind} file: it ends (inside a chunk header, )?before its audio")]:
        path = tmp_path / f"cut.{suffix}"
        path.write_bytes(whole[:kept])
        with pytest.raises(ValueError, match=message):
            load_audio(path)


def test_a_wav_file_cut_inside_a_chunk_header_is_refused(tmp_path):
    """Cut 2 bytes short of its data chunk's 8-byte header, a WAV file loaded as empty audio (review)."""
    whole = _wav_bytes(tmp_path, 16000)
    data = whole.index(b"data")
    for kept, message in [(data + 6, "it ends inside a chunk header"), (16, "it ends inside a chunk header"),
                          (data, "it ends before its data chunk")]:
        path = tmp_path / "cut.wav"
        path.write_bytes(whole[:kept])
        with pytest.raises(ValueError, match=f"truncated WAV file: {message}"):
            load_audio(path)


@pytest.mark.parametrize("placeholder", [0, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_a_wav_file_with_a_streaming_size_placeholder_loads_whole(tmp_path, placeholder):
    """Writers that cannot seek back (pipes) leave a placeholder as the data size: complete files, not cut ones.
    arecord's 0x80000000 was refused as truncated, and with 0 libsndfile read no audio at all (review)."""
    samples = (np.sin(np.arange(1600) * 0.05) * 8000).astype(np.int16)
    soundfile.write(tmp_path / "whole.wav", samples, SAMPLE_RATE)
    whole = bytearray((tmp_path / "whole.wav").read_bytes())
    assert whole[36:40] == b"data"
    whole[40:44] = placeholder.to_bytes(4, "little")
    whole[4:8] = min(placeholder + 36, 0xFFFFFFFF).to_bytes(4, "little")
    (tmp_path / "piped.wav").write_bytes(bytes(whole))
    assert torch.equal(load_audio(tmp_path / "piped.wav"), load_audio(tmp_path / "whole.wav"))


def test_an_empty_data_chunk_followed_by_other_chunks_is_empty_audio(tmp_path):
    # a declared size of 0 is a placeholder only where no chunk follows it
    empty = bytearray(_wav_bytes(tmp_path, 0))
    assert empty[36:40] == b"data" and empty[40:44] == bytes(4)
    listed = empty + b"LIST" + (8).to_bytes(4, "little") + b"INFOabcd"
    listed[4:8] = (len(listed) - 8).to_bytes(4, "little")
    (tmp_path / "listed.wav").write_bytes(bytes(listed))
    assert load_audio(tmp_path / "listed.wav").shape == (0,)


def test_a_file_name_that_is_not_utf8_loads(tmp_path):
    # Linux file names are bytes; soundfile encoded the name as UTF-8 and failed on it (review)
    samples = (np.sin(np.arange(1600) * 0.05) * 8000).astype(np.int16)
    soundfile.write(tmp_path / "plain.wav", samples, SAMPLE_RATE)
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/\xff.wav"))
    odd.write_bytes((tmp_path / "plain.wav").read_bytes())
    assert torch.equal(load_audio(odd), load_audio(tmp_path / "plain.wav"))


def test_a_float_file_beyond_full_scale_warns_naming_it(tmp_path):
    soundfile.write(tmp_path / "loud.wav", np.array([0.0, 20000.0, -3.0] * 600, np.float32), SAMPLE_RATE,
                    subtype="FLOAT")
    with pytest.warns(UserWarning, match=r"loud.wav: samples reach 20000, expected \[-1, 1\]: a float file"):
        load_audio(tmp_path / "loud.wav")


@pytest.mark.parametrize("chunk, field, value, message", [
    # an SSND audio offset past the end of the file loaded as empty audio (audit)
    (b"SSND", 8, 0xFFFFFFF0, r"corrupt AIFF file: its SSND chunk's audio offset \(4294967280 bytes\) points past "
                             r"the end of its 3200 bytes of sample data"),
    # COMM declaring more sample frames than SSND holds loaded the shorter audio (audit); 1600 frames are there
    (b"COMM", 10, 2000, r"truncated AIFF file: its COMM chunk declares 2000 sample frames \(4000 bytes of audio\), "
                        r"its SSND chunk holds 3200"),
])
def test_an_aiff_file_whose_chunks_disagree_is_refused_naming_it(tmp_path, chunk, field, value, message):
    soundfile.write(tmp_path / "whole.aiff", np.zeros(1600, np.float32), SAMPLE_RATE, format="AIFF", subtype="PCM_16")
    damaged = bytearray((tmp_path / "whole.aiff").read_bytes())
    at = damaged.index(chunk) + field
    damaged[at:at + 4] = value.to_bytes(4, "big")
    path = tmp_path / "damaged.aiff"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=message) as raised:
        load_audio(path)
    assert str(raised.value).startswith(str(path))


@pytest.mark.parametrize("subtype", ["PCM_S8", "PCM_U8", "PCM_24", "FLOAT", "DOUBLE", "ULAW", "ALAW"])
def test_whole_aiff_and_aifc_files_load(tmp_path, subtype):
    # AIFC's compressed samples (ulaw, alaw) are not sized by COMM's bits per sample: no frame check for them
    soundfile.write(tmp_path / "tone.aiff", 0.3 * _tone(SAMPLE_RATE, 0.1), SAMPLE_RATE, format="AIFF",
                    subtype=subtype)
    assert load_audio(tmp_path / "tone.aiff").shape == (1600,)


def test_a_fifo_or_a_link_to_a_device_is_named_as_not_a_regular_file(tmp_path):
    """Both were "audio file not found", though they exist (audit)."""
    os.mkfifo(tmp_path / "fifo.wav")
    (tmp_path / "zero.wav").symlink_to("/dev/zero")
    for name in ("fifo.wav", "zero.wav"):
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / name))} is not a regular file"):
            load_audio(tmp_path / name)


def test_an_mp3_cut_short_is_refused_where_its_header_states_its_length(tmp_path):
    """libmpg123 decodes what is left of a cut MP3 without an error; its Xing/LAME header says how long it was (a
    user audit). Without that header the length is estimated from the file's size: such a file still loads."""
    soundfile = pytest.importorskip("soundfile")
    tone = (0.3 * np.sin(np.arange(32000) * 0.05)).astype(np.float32)
    whole = tmp_path / "whole.mp3"
    soundfile.write(whole, tone, SAMPLE_RATE, format="MP3")
    data = whole.read_bytes()
    assert data.find(b"Xing") >= 0 or data.find(b"Info") >= 0  # the length header libsndfile writes
    assert abs(load_audio(whole).numel() - tone.size) < 2000
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(cut))}: truncated MP3 file: its header declares \d+ frames"):
        load_audio(cut)
    headerless = bytearray(data[: len(data) // 2])
    at = headerless.find(b"Xing") if headerless.find(b"Xing") >= 0 else headerless.find(b"Info")
    headerless[at:at + 4] = b"XXXX"
    (tmp_path / "headerless.mp3").write_bytes(headerless)
    assert load_audio(tmp_path / "headerless.mp3").numel() > 0
