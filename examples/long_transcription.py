"""Long-form transcription with tiny.en: a minute or more of eSpeak NG speech, with pauses, as timed segments.

Run:  .venv/bin/python examples/long_transcription.py [--sentences 20] [--seed 0] [--threads 2]

Sentences of dreidel's test set (voices and rates drawn by the seed) are joined with pauses of 0.2-1.5 s and
transcribed twice: with timestamps (``transcribe``'s default: timed segments, each 30 s window resuming the
previous window's unfinished segment) and without (consecutive 30 s cuts). It prints where each sentence
starts, the segments, and the word error rate of both against the sentences. By hand it reads

    result = whisper.transcribe(whisper.load("tiny.en"), audio)      # audio: 16 kHz, or a file path
    for segment in result.segments:
        print(f"[{segment.start:.2f} -> {segment.end:.2f}] {segment.text}")
"""

from __future__ import annotations

import argparse
import random

import torch

from dreidel.cli._args import MAX_THREADS, int_in_range, seed
from dreidel.cli._table import counted


def speech_with_pauses(sentences: int, seed: int) -> tuple[torch.Tensor, list[tuple[float, str]]]:
    """16 kHz audio of ``sentences`` test sentences with random pauses, and (start in seconds, text) of each."""
    from dreidel.audio import SAMPLE_RATE
    from dreidel.data.speech import speech_test_set, synthesize

    pauses = random.Random(seed)
    parts, starts, at = [], [], 0
    for item in speech_test_set(sentences, seed=seed):
        starts.append((at / SAMPLE_RATE, item.text))
        clip = torch.from_numpy(synthesize(item.text, voice=item.voice, rate=item.rate))
        pause = torch.zeros(int(SAMPLE_RATE * pauses.uniform(0.2, 1.5)))
        parts += [clip, pause]
        at += clip.numel() + pause.numel()
    return torch.cat(parts), starts


def words(text: str) -> str:
    """Lowercase words without punctuation (digits stay digits: eSpeak says "7" as "seven", a word error)."""
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace() or c == "'").split())


def main() -> None:
    import jiwer

    from dreidel.models import whisper

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int_in_range(1, 100), default=20, help="how many sentences (default 20)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the sentences, voices, rates and pauses")
    parser.add_argument("--threads", type=int_in_range(1, MAX_THREADS), default=None,
                        help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    audio, starts = speech_with_pauses(args.sentences, args.seed)
    recognizer = whisper.load("tiny.en")
    threads = counted(torch.get_num_threads(), "thread")
    print(f"{audio.numel() / 16000:.1f} s of speech, {len(starts)} sentences, {threads}\n")
    print("spoken:")
    for start, text in starts:
        print(f"  {start:7.2f}  {text}")
    reference = words(" ".join(text for _, text in starts))
    timed = whisper.transcribe(recognizer, audio)
    print("\ntranscribed with timestamps:")
    for segment in timed.segments:
        print(f"  [{segment.start:7.2f} -> {segment.end:7.2f}] {segment.text}")
    cut = whisper.transcribe(recognizer, audio, timestamps=False)
    for name, result in (("with timestamps", timed), ("30 s cuts", cut)):
        print(f"\n{name}: WER {100 * jiwer.wer(reference, words(result.text)):.1f} %, {len(result.tokens)} windows, "
              f"{result.seconds_compute:.1f} s compute (RTF {result.rtf:.3f})")


if __name__ == "__main__":
    main()
