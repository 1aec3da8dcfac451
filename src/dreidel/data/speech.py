"""Offline English speech from eSpeak NG (formant synthesis), for Whisper tests and benchmarks.

``libespeak-ng`` and its data ship in the PyPI wheel ``espeakng-loader``; this module calls the C API through
``ctypes`` in synchronous mode: ``espeak_Synth`` returns only after the synth callback has received every
int16 chunk at eSpeak's native rate (22050 Hz), which is then resampled to 16 kHz. eSpeak keeps global state,
so one lock serialises every call and the library is initialised once, lazily.

A voice is ``"<language>[+<variant>]"``, e.g. ``"en-us"``, ``"en-gb-x-rp"``, ``"en-us+f2"``, ``"en+m3"``.
"""

from __future__ import annotations

import ctypes
import hashlib
import numbers
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dreidel._files import replaced_atomically
from dreidel.audio import SAMPLE_RATE, resample
from dreidel.data._split import check_seed

__all__ = [
    "synthesize", "synthesize_to_file", "cached_speech", "available_voices", "available_variants",
    "SpeechItem", "speech_test_set", "test_sentences", "TEST_VOICES", "TEST_RATES",
]

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # report errors instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAMETER_RATE = 1
_PARAMETER_PITCH = 3
_EE_OK = 0

_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


class _ESpeak:
    """The loaded library, its native rate and the chunk collector of the current call (guarded by _LOCK)."""

    def __init__(self):
        import espeakng_loader

        self.data_path = Path(espeakng_loader.get_data_path())
        self.library = ctypes.CDLL(espeakng_loader.get_library_path())
        lib = self.library
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(),
                                                 _INITIALIZE_DONT_EXIT)
        if self.native_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {self.native_rate}) with data at {self.data_path}")
        self.chunks: list[np.ndarray] = []
        self.callback = _SYNTH_CALLBACK(self._collect)  # kept alive as long as the library may call it
        lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, n_samples, events) -> int:
        if wav and n_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n_samples,)).copy())
        return 0  # 0 = continue synthesis


_LOCK = threading.Lock()
_ENGINE: _ESpeak | None = None


def _engine() -> _ESpeak:
    """The initialised library; call with _LOCK held."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _ESpeak()
    return _ENGINE


def available_voices(language_prefix: str = "en") -> list[str]:
    """Language codes of the shipped voices whose code starts with ``language_prefix`` (lower case, sorted),
    e.g. ``["en", "en-029", "en-gb-scotland", ..., "en-us", "en-us-nyc"]``."""
    with _LOCK:
        voices = _engine().library.espeak_ListVoices(None)
        codes = set()
        index = 0
        while voices[index]:
            identifier = voices[index].contents.identifier.decode()
            code = identifier.split("/")[-1].lower()
            if code.startswith(language_prefix.lower()):
                codes.add(code)
            index += 1
    return sorted(codes)


def available_variants() -> list[str]:
    """Voice variants (``"m1"``…``"m7"``, ``"f1"``…``"f5"``, named ones) usable as ``"en-us+<variant>"``."""
    with _LOCK:
        variant_dir = _engine().data_path / "voices" / "!v"
    return sorted(path.name for path in variant_dir.iterdir() if path.is_file())


def synthesize(text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """Speak ``text`` with eSpeak NG.

    Args:
        text: UTF-8 text (plain, no SSML); must contain something to say.
        voice: ``"<language>[+<variant>]"``, see :func:`available_voices` and :func:`available_variants`.
        rate: words per minute, 80 to 450. pitch: 0 to 100 (50 is the voice's normal pitch).

    Returns:
        float32 mono waveform ``(samples,)`` at 16 kHz in [-1, 1].

    Reproducibility: the same sequence of calls in a fresh process gives the same audio, but eSpeak keeps
    internal state between utterances that neither its seed functions nor re-initialisation reset, so saying
    the same text again gives slightly different audio (a few samples in length, small waveform changes).
    Use :func:`cached_speech` to fix the audio of a test set once.

    Raises:
        ValueError: empty text or text with nothing to say (punctuation alone), unknown voice or variant, rate
            or pitch out of range.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string, got {text!r}")
    if "\0" in text:  # the C API reads up to the first NUL and would silently drop the rest
        raise ValueError(f"text must not contain NUL characters, got {text[:40]!r}")
    if not isinstance(voice, str) or not voice or "\0" in voice:  # the C API would cut the name at a NUL
        raise ValueError(f"voice must be a non-empty string such as 'en-us' or 'en-us+f2' (no NUL), got {voice!r}")
    variant = voice.partition("+")[2]
    if "+" in voice and variant not in available_variants():  # eSpeak would silently use the plain voice
        raise ValueError(f"unknown voice variant {variant!r} in voice {voice!r}; expected one of available_variants(), "
                         f"e.g. 'en-us+f2'")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or not 80 <= rate <= 450:  # NumPy ints too
        raise ValueError(f"rate must be an int in [80, 450] words per minute, got {rate!r}")
    if isinstance(pitch, bool) or not isinstance(pitch, numbers.Integral) or not 0 <= pitch <= 100:
        raise ValueError(f"pitch must be an int in [0, 100], got {pitch!r}")
    rate, pitch = int(rate), int(pitch)
    encoded = text.encode("utf-8") + b"\0"
    with _LOCK:
        engine = _engine()
        lib = engine.library
        if lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"unknown voice {voice!r}; expected e.g. 'en-us' or 'en-us+f2' (see available_voices())")
        lib.espeak_SetParameter(_PARAMETER_RATE, rate, 0)
        lib.espeak_SetParameter(_PARAMETER_PITCH, pitch, 0)
        engine.chunks = []
        lib.espeak_ng_SetRandSeed(0)  # fixes eSpeak's own noise generator; see the note on reproducibility
        status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        lib.espeak_Synchronize()
        chunks, engine.chunks = engine.chunks, []
        native_rate = engine.native_rate
    if status != _EE_OK:
        raise RuntimeError(f"espeak_Synth failed with status {status} for text {text[:40]!r}")
    pcm = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
    if not pcm.any():  # nothing, or the few milliseconds of silence eSpeak makes of text it does not say ("...")
        raise ValueError(f"eSpeak produced no audio for text {text[:40]!r}: it has nothing to say")
    audio = resample(torch.from_numpy(pcm), native_rate, SAMPLE_RATE)
    return audio.clamp_(-1.0, 1.0).numpy()


def synthesize_to_file(text: str, path, voice: str = "en-us", rate: int = 175, pitch: int = 50) -> Path:
    """:func:`synthesize` into a 16-bit 16 kHz WAV file written atomically; returns the path."""
    import soundfile

    path = Path(path)
    audio = synthesize(text, voice=voice, rate=rate, pitch=pitch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, suffix=".wav") as (handle, temp_name):
        os.close(handle)
        soundfile.write(temp_name, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return path


def cached_speech(text: str, voice: str = "en-us", rate: int = 175, cache_dir=".cache/speech",
                  pitch: int = 50) -> Path:
    """The WAV file of ``text`` spoken with these settings, synthesised once into ``cache_dir`` (relative to
    the current directory unless absolute).

    The file name is a hash of (text, voice, rate, pitch), so a changed sentence gets a new file (`make` installs
    the espeakng-loader release pinned in constraints.txt). A cached file that does not read back
    as whole audio (cut short or damaged by something else: dreidel writes it atomically) is synthesised
    again.
    """
    key = hashlib.sha256(f"{voice}\x1f{rate}\x1f{pitch}\x1f{text}".encode("utf-8")).hexdigest()[:24]
    path = Path(cache_dir) / f"{key}.wav"
    if not _reads_back(path):
        synthesize_to_file(text, path, voice=voice, rate=rate, pitch=pitch)
    return path


def _reads_back(path: Path) -> bool:
    """Whether ``path`` is a WAV file that ``load_audio`` reads whole (its truncation checks included)."""
    from dreidel.audio import load_audio

    if not path.is_file():
        return False
    try:
        return load_audio(path).numel() > 0
    except ValueError:
        return False


# ---- the test set -----------------------------------------------------------------------------------------------

TEST_VOICES = ("en-us", "en", "en-us+m3", "en-us+f2", "en-gb-x-rp")
TEST_RATES = (140, 160, 180)  # words per minute; tiny.en degrades quickly above ~190 on eSpeak


@dataclass(frozen=True)
class SpeechItem:
    """One test utterance: the sentence and how it is spoken."""

    index: int
    text: str
    voice: str
    rate: int


SENTENCES_FILE = Path(__file__).with_name("sentences.txt")  # package data: in wheels too, unlike tests/


def test_sentences(path=None) -> list[str]:
    """The project's test sentences (one per line in ``dreidel/data/sentences.txt`` unless ``path`` is given)."""
    path = SENTENCES_FILE if path is None else Path(path)
    if not path.is_file():
        raise ValueError(f"sentence file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


test_sentences.__test__ = False  # not a pytest test despite its name


def speech_test_set(n: int | None = None, seed: int = 0, *, sentences: list[str] | None = None,
                    voices=TEST_VOICES, rates=TEST_RATES) -> list[SpeechItem]:
    """``n`` sentences (all when ``None``), each with a voice and rate drawn deterministically from ``seed``.

    The sentence order is shuffled by ``seed`` too, so a small ``n`` still mixes the kinds of sentence.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a list of strings, got one string (it would be split into characters)")
    sentences = test_sentences() if sentences is None else list(sentences)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(sentences)):
        raise ValueError(f"n must be None or an int in [0, {len(sentences)}], got {n!r}")
    if isinstance(voices, str):  # as for sentences: tuple("en-us") would be the voices "e", "n", "-", ...
        raise TypeError(f"voices must be a list of voice names, got one string {voices!r} (use [{voices!r}])")
    voices, rates = tuple(voices), tuple(rates)
    if not voices or not rates:
        raise ValueError(f"voices and rates must each hold at least one choice, got {voices!r} and {rates!r}")
    bad_rates = [r for r in rates if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 80 <= r <= 450]
    if bad_rates:  # checked here, not at the first synthesize() that draws one
        raise ValueError(f"rates must be ints in [80, 450] words per minute, got {bad_rates[0]!r}")
    generator = random.Random(check_seed(seed))  # None would draw a different set at every call
    order = list(range(len(sentences)))
    generator.shuffle(order)
    items = [SpeechItem(index, sentences[index], generator.choice(voices), generator.choice(rates))
             for index in order]
    return items if n is None else items[:n]
