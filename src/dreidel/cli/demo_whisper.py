"""The Whisper step of `dreidel demo`: two synthesised sentences transcribed by tiny.en on the CPU."""

from __future__ import annotations

import random


def whisper_step(seed: int) -> None:
    """Synthesise 2 short sentences with eSpeak NG, transcribe them with tiny.en, print text and RTF."""
    import torch

    from dreidel.cli._table import counted, format_table
    from dreidel.data.speech import synthesize, test_sentences
    from dreidel.models import whisper

    sentences = sorted(test_sentences(), key=len)[:30]  # short ones keep the step under 30 s
    picked = random.Random(seed).sample(sentences, 2)
    print(f"Whisper tiny.en on eSpeak NG speech ({counted(torch.get_num_threads(), 'thread')}, greedy)")
    recognizer = whisper.load("tiny.en")
    audio = [torch.from_numpy(synthesize(text, voice="en-us", rate=165)) for text in picked]
    results = whisper.transcribe(recognizer, audio)
    rows = [(text, result.text, result.rtf) for text, result in zip(picked, results)]
    print(format_table(["reference", "transcript", "RTF"], rows))
