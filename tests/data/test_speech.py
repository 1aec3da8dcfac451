"""eSpeak NG speech: shape and rate, voices, thread safety, the test set, and faster-whisper as the listener."""

import re
import threading

import numpy as np
import pytest

speech = pytest.importorskip("dreidel.data.speech")
pytest.importorskip("espeakng_loader")

SENTENCE = "Please close the window before the rain comes in."


def test_synthesize_returns_speech_at_16k():
    audio = speech.synthesize(SENTENCE)
    assert audio.dtype == np.float32 and audio.ndim == 1
    seconds = audio.shape[0] / 16000
    words = len(SENTENCE.split())
    assert 0.5 * words / (175 / 60) < seconds < 2.0 * words / (175 / 60) + 1.0  # about 175 words per minute
    assert np.abs(audio).max() <= 1.0
    assert np.sqrt(np.mean(audio**2)) > 0.01  # not silent
    # band-limited to 8 kHz by the resampler: almost no energy in the top 200 Hz
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    assert spectrum[-len(spectrum) // 40:].sum() < 1e-3 * spectrum.sum()


def test_rate_changes_duration():
    slow, fast = speech.synthesize(SENTENCE, rate=120), speech.synthesize(SENTENCE, rate=300)
    assert slow.shape[0] > 1.8 * fast.shape[0]


def test_voices_differ_and_are_listed():
    voices = speech.available_voices()
    assert {"en", "en-us", "en-gb-x-rp"} <= set(voices)
    assert {"m3", "f2"} <= set(speech.available_variants())
    voices = ("en-us", "en-us+f2", "en-gb-x-rp", "en-us+m3")
    spectra = {voice: _average_spectrum(speech.synthesize("Good morning, how are you today?", voice=voice))
               for voice in voices}
    same_voice_distance = max(
        np.abs(_average_spectrum(speech.synthesize("Good morning, how are you today?", voice=voice))
               - spectra[voice]).mean() for voice in ("en-us", "en-gb-x-rp"))
    for i, first in enumerate(voices):
        for second in voices[i + 1:]:
            assert np.abs(spectra[first] - spectra[second]).mean() > 1.5 * same_voice_distance, (first, second)


def _average_spectrum(audio, frame=512):
    """Mean log power spectrum from 125 Hz to 6 kHz: a voice's timbre, insensitive to small timing changes."""
    frames = audio[: len(audio) // frame * frame].reshape(-1, frame) * np.hanning(frame)
    power = np.mean(np.abs(np.fft.rfft(frames, axis=1)) ** 2, axis=0)[4:193]
    return np.log10(power + 1e-10)


def test_concurrent_calls_are_not_mixed_up():
    """Two threads synthesising different sentences each get their own sentence, whole (same length and
    timbre as a sequential call; exact samples differ between calls, see synthesize's note)."""
    texts = ["One two three four.", "The lighthouse guided the ships safely into the harbor at night."]
    expected = [speech.synthesize(text, voice="en-us+m3") for text in texts]
    results = {}

    def work(index):
        for _ in range(3):
            results.setdefault(index, []).append(speech.synthesize(texts[index], voice="en-us+m3"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1]
    for index, outputs in results.items():
        assert len(outputs) == 3
        for output in outputs:
            assert abs(output.shape[0] - expected[index].shape[0]) < 0.02 * expected[index].shape[0]
            assert np.abs(_average_spectrum(output) - _average_spectrum(expected[index])).mean() < 0.2


@pytest.mark.parametrize("kwargs, message", [
    ({"text": "   "}, "text"), ({"text": "hi", "voice": "xx-not-a-voice"}, "unknown voice"),
    ({"text": "hi", "voice": "en-us+zz9"}, "unknown voice variant 'zz9'"),
    ({"text": "hi", "voice": "en-us+"}, "variant"),
    ({"text": "hi\0there"}, "NUL"),
    ({"text": "hi", "voice": "en-us\0+f2"}, "no NUL"),  # eSpeak got "en-us": the f2 variant silently lost (review)
    ({"text": "hi", "rate": 10}, "rate"), ({"text": "hi", "pitch": 101}, "pitch"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        speech.synthesize(**kwargs)


def test_cached_speech_writes_once(tmp_path):
    soundfile = pytest.importorskip("soundfile")
    path = speech.cached_speech("Stop the music.", "en-us", 175, cache_dir=tmp_path)
    audio, rate = soundfile.read(path, dtype="float32")
    assert rate == 16000 and audio.dtype == np.float32 and np.sqrt(np.mean(audio**2)) > 0.01
    stamp = path.stat().st_mtime_ns
    assert speech.cached_speech("Stop the music.", "en-us", 175, cache_dir=tmp_path) == path
    assert path.stat().st_mtime_ns == stamp
    assert speech.cached_speech("Stop the music.", "en-us", 200, cache_dir=tmp_path) != path
    assert [p.suffix for p in tmp_path.iterdir()] == [".wav", ".wav"]  # no temp files left


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"", lambda data: b"RIFF"])
def test_a_damaged_cached_file_is_synthesised_again(tmp_path, damage):
    """Only the file's existence was checked: a cut-short or emptied cache file was returned for good, and
    loading it then failed with "truncated WAV" (a user audit)."""
    pytest.importorskip("soundfile")
    from dreidel.audio import load_audio

    path = speech.cached_speech("Stop the music.", "en-us", 175, cache_dir=tmp_path)
    whole = path.read_bytes()
    path.write_bytes(damage(whole))
    assert speech.cached_speech("Stop the music.", "en-us", 175, cache_dir=tmp_path) == path
    # synthesised again: whole (eSpeak may differ by a few samples from one call to the next in a process)
    assert load_audio(path).numel() > 0 and abs(path.stat().st_size - len(whole)) < len(whole) // 20


def test_written_file_gets_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = speech.synthesize_to_file("Stop the music.", tmp_path / "stop.wav")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["stop.wav"]


@pytest.mark.parametrize("kwargs, error, message", [
    ({"n": True}, ValueError, "n must be None or an int"), ({"n": 2.0}, ValueError, "n must be None or an int"),
    ({"n": 2, "voices": ()}, ValueError, "voices and rates"),  # used to be an IndexError from random.choice
    ({"n": 2, "rates": []}, ValueError, "voices and rates"),
    ({"n": 2, "sentences": "one sentence"}, TypeError, "sentences must be a list"),
    # a string of voices was split into the voices "e", "n", "-", ..., a bad rate met only inside synthesize,
    # and seed=None drew a different set at every call
    ({"n": 2, "voices": "en-us"}, TypeError, "voices must be a list of voice names"),
    ({"n": 2, "rates": [160, 10000]}, ValueError, r"rates must be ints in \[80, 450\].*10000"),
    ({"n": 2, "seed": None}, ValueError, "seed must be an int"),
])
def test_speech_test_set_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        speech.speech_test_set(**kwargs)


def test_sentences_ship_inside_the_package():
    # They lived in tests/data/, which wheels leave out, so an installed `dreidel demo` failed at its Whisper step.
    import importlib.resources

    packaged = importlib.resources.files("dreidel.data").joinpath("sentences.txt")
    assert packaged.is_file()
    assert speech.test_sentences() == speech.test_sentences(packaged)


def test_sentence_file_and_test_set():
    sentences = speech.test_sentences()
    assert len(sentences) >= 100 and len(set(sentences)) == len(sentences)
    assert all(sentence.isascii() for sentence in sentences)
    assert sum(sentence.endswith("?") for sentence in sentences) >= 10
    items = speech.speech_test_set(seed=3)
    assert sorted(item.text for item in items) == sorted(sentences)
    assert items == speech.speech_test_set(seed=3)
    assert items[:5] == speech.speech_test_set(5, seed=3)
    assert items != speech.speech_test_set(seed=4)
    assert items == speech.speech_test_set(seed=np.int64(3))  # passed the check, then random.Random refused it
    assert len({item.voice for item in items}) == len(speech.TEST_VOICES)
    assert len({item.rate for item in items}) == len(speech.TEST_RATES)
    with pytest.raises(ValueError, match="n must be"):
        speech.speech_test_set(len(sentences) + 1)


def _words(text):
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def test_faster_whisper_understands_the_speech():
    """The real oracle: an independent recogniser (faster-whisper, tiny.en int8) transcribes our audio."""
    faster_whisper = pytest.importorskip("faster_whisper")
    jiwer = pytest.importorskip("jiwer")
    from dreidel.io import shipped_whisper_files

    try:
        model_dir = shipped_whisper_files("tiny.en").directory
    except ValueError as error:
        pytest.skip(str(error))
    model = faster_whisper.WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=1)
    sentences = ["Turn left at the second traffic light and park behind the library.",
                 "Please close the window before the rain comes in.",
                 "Where did you put the keys to the car?"]
    references, hypotheses = [], []
    for sentence in sentences:
        segments, _ = model.transcribe(speech.synthesize(sentence, rate=160), beam_size=1, language="en",
                                       without_timestamps=True, condition_on_previous_text=False)
        references.append(" ".join(_words(sentence)))
        hypotheses.append(" ".join(_words(" ".join(segment.text for segment in segments))))
    assert jiwer.wer(references, hypotheses) < 0.15, list(zip(references, hypotheses))


def test_text_with_nothing_to_say_is_refused():
    """"..." used to give 7 ms of silence, which transcribes as "you"."""
    with pytest.raises(ValueError, match="nothing to say"):
        speech.synthesize("...")


def test_synthesize_takes_numpy_integers_and_refuses_a_bool_pitch():
    audio = speech.synthesize("Stop.", rate=np.int64(175), pitch=np.int32(50))
    assert audio.size > 0
    with pytest.raises(ValueError, match="pitch must be an int"):
        speech.synthesize("Stop.", pitch=True)
