"""Decoding with timestamps: the rules against a token-by-token oracle, segments, and seeking through long audio."""

from __future__ import annotations

import math
import random

import pytest
import torch
from _whisper_helpers import faint, speech_clips

from dreidel.models.whisper import DecodingOptions, Segment, transcribe
from dreidel.models.whisper.decoding import ScoredWindow, _apply_timestamp_rules, _beam_search, _greedy
from dreidel.models.whisper.transcribe import _Progress, _timed_segments

# A small vocabulary for the rules: text 0..19, <|endoftext|> 20, <|notimestamps|> 25, timestamps 26..39.
EOT, BEGIN, VOCAB, MAX_INITIAL = 20, 26, 40, 3
SMALL = DecodingOptions(prompt=(21,), eot=EOT, timestamp_begin=BEGIN, max_initial_timestamp=MAX_INITIAL)


def allowed(history: list[int], token: int) -> bool:
    """Whether ``token`` may follow ``history`` (before the probability rule), written token by token from the
    rules of Whisper's timestamp prediction."""
    is_time = token >= BEGIN
    if token == BEGIN - 1:
        return False  # <|notimestamps|>
    if not history:
        return is_time and token - BEGIN <= MAX_INITIAL
    times = [t for t in history if t >= BEGIN]
    if history[-1] >= BEGIN and (len(history) == 1 or history[-2] >= BEGIN):
        return not is_time  # a segment just opened: text, or the end
    if history[-1] >= BEGIN:
        return token == EOT or (is_time and token >= times[-1])  # one closed: the next opens, or the end
    return not is_time or not times or token > times[-1]  # inside text: a segment ends after it starts


def oracle(logits: torch.Tensor, history: list[int]) -> set[int]:
    """The tokens left finite: the rules, then timestamps only where together they beat every other token."""
    row = logits.double().clone()
    for token in range(VOCAB):
        if not allowed(history, token):
            row[token] = -math.inf
    logprobs = row.log_softmax(-1)
    if logprobs[BEGIN:].logsumexp(-1) > logprobs[:BEGIN].max():
        row[:BEGIN] = -math.inf
    return {t for t in range(VOCAB) if math.isfinite(row[t])}


def random_history(rng: random.Random) -> list[int]:
    """A sequence the rules allow, drawn token by token."""
    history: list[int] = []
    for _ in range(rng.randrange(0, 9)):
        options = [t for t in range(VOCAB) if t != EOT and allowed(history, t)]
        if not options:
            break
        history.append(rng.choice(options))
    return history


def test_timestamp_rules_equal_a_token_by_token_oracle():
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    histories = [random_history(rng) for _ in range(300)]
    logits = torch.randn(len(histories), VOCAB, generator=generator) * 3
    logits[::3, BEGIN:] += 4  # rows where the timestamps are likelier together
    masked = logits.clone()
    _apply_timestamp_rules(masked, histories, SMALL)
    for row, history in enumerate(histories):
        finite = {t for t in range(VOCAB) if math.isfinite(masked[row, t])}
        assert finite == oracle(logits[row], history), history
        assert torch.equal(masked[row][list(finite)], logits[row][list(finite)])  # the rest is untouched
    assert any(not math.isfinite(masked[row, :BEGIN].max()) and len(h) > 0 and h[-1] < BEGIN
               for row, h in enumerate(histories))  # the probability rule did force timestamps somewhere


RANDOM_TIMESTAMP_OPTIONS = DecodingOptions(prompt=(50257,), eot=50256, suppress_tokens=(1, 2, 50257),
                                           begin_suppress_tokens=(220, 50256), max_new_tokens=12,
                                           timestamp_begin=50363)


@torch.inference_mode()
def test_greedy_and_beam_search_keep_the_timestamp_rules(random_whisper):
    """Every sampled sequence of a random model follows the rules; beam search with one beam is greedy."""
    features = torch.randn(3, 1500, random_whisper.dims.n_audio_state, generator=torch.Generator().manual_seed(8))
    options = RANDOM_TIMESTAMP_OPTIONS
    greedy = _greedy(random_whisper, features, options, 12)
    begin = options.timestamp_begin
    for tokens, *_ in greedy:
        assert tokens and tokens[0] >= begin and tokens[0] - begin <= options.max_initial_timestamp
        assert begin - 1 not in tokens
        times = [t for t in tokens if t >= begin]
        assert times == sorted(times)
        for i in range(2, len(tokens)):  # never three timestamps in a row
            assert not all(t >= begin for t in tokens[i - 2:i + 1])
    beam = _beam_search(random_whisper, features, options, 12)
    assert [window.tokens for window in beam] == [window.tokens for window in greedy]


def test_options_for_timestamps_are_validated():
    with pytest.raises(ValueError, match="timestamp_begin must be None or the id of <|0.00|>"):
        DecodingOptions(prompt=(1,), eot=20, timestamp_begin=20)
    with pytest.raises(ValueError, match="must not hold <|notimestamps|>"):
        DecodingOptions(prompt=(21, 25), eot=20, timestamp_begin=26)
    with pytest.raises(ValueError, match="max_initial_timestamp"):
        DecodingOptions(prompt=(21,), eot=20, timestamp_begin=26, max_initial_timestamp=-1)


def test_decode_refuses_timestamps_past_the_vocabulary(random_whisper):
    """Every token was masked at the first step (tokens of id 0 came out), or an IndexError was raised."""
    from dreidel.models.whisper import decode

    mel = torch.zeros(1, 80, 3000)
    for begin in (random_whisper.dims.n_vocab, 60000):
        options = DecodingOptions(prompt=(50257,), eot=50256, timestamp_begin=begin, max_new_tokens=3)
        with pytest.raises(ValueError, match="past the model's vocabulary"):
            decode(random_whisper, mel, options)


def test_prompts_with_and_without_timestamps(tiny_en):
    tokenizer = tiny_en.tokenizer
    assert tokenizer.prompt() == [tokenizer.sot, tokenizer.no_timestamps]
    assert tokenizer.prompt(timestamps=True) == [tokenizer.sot]
    assert tokenizer.timestamp_begin == tokenizer.no_timestamps + 1
    assert tiny_en.model.dims.n_vocab - tokenizer.timestamp_begin == 1501  # <|0.00|> .. <|30.00|>
    with pytest.raises(TypeError, match="timestamps must be a bool"):
        tokenizer.prompt("en", timestamps="yes")


B = 100  # <|0.00|> in the cases below; <|1.00|> is 150


@pytest.mark.parametrize("tokens, window, ended, segments, accounted", [
    # closed segments to the end: the window holds no more speech
    ([B, 1, 2, B + 50, B + 50, 3, B + 100], 30.0, True, [(0.0, 1.0, [1, 2]), (1.0, 2.0, [3])], 30.0),
    # a segment left open, with text or without: the next window starts 1 s before it opened, but not before
    # the last closed segment ended
    ([B, 1, B + 50, B + 55, 3, 4], 30.0, True, [(0.0, 1.0, [1])], 1.0),
    ([B, 1, B + 50, B + 300], 30.0, True, [(0.0, 1.0, [1])], 5.0),
    ([B, 1, B + 50, B + 300, 3], 30.0, True, [(0.0, 1.0, [1])], 5.0),
    # stopped at the token limit: what follows the last closed segment is decoded again
    ([B, 1, B + 50], 30.0, False, [(0.0, 1.0, [1])], 1.0),
    ([B, 1, B + 50, B + 300, 3], 30.0, False, [(0.0, 1.0, [1])], 5.0),
    # nothing closed: the text is one segment to the window's end, the token limit or not
    ([B + 10, 1, 2], 30.0, True, [(0.2, 30.0, [1, 2])], 30.0),
    ([B + 10, 1, 2], 30.0, False, [(0.2, 30.0, [1, 2])], 30.0),
    ([1, 2], 30.0, True, [(0.0, 30.0, [1, 2])], 30.0),
    ([], 30.0, True, [], 30.0),
    ([B], 30.0, True, [], 30.0),
    # times past the audio of a short last window are clamped to it
    ([B, 1, B + 400], 5.0, True, [(0.0, 5.0, [1])], 5.0),
])
def test_timed_segments(tokens, window, ended, segments, accounted):
    got = _timed_segments(tokens, B, window, ended)
    assert [(pytest.approx(s), pytest.approx(e), t) for s, e, t in segments] == got.segments
    assert got.seconds == pytest.approx(accounted)


@pytest.mark.parametrize("at_limit", [True, False])
def test_a_window_at_the_token_limit_is_resumed_after_its_last_closed_segment(tiny_en, monkeypatch, at_limit):
    """Each window's tokens close a segment at 1.00 s: with <|endoftext|> after them the window is done (the
    input ends after one window); at the token limit (no <|endoftext|>) the rest of the window is decoded again
    from 1.00 s on, window after window (a review's 64 s input with max_new_tokens=8 lost 28 s of speech)."""
    import importlib

    module = importlib.import_module("dreidel.models.whisper.transcribe")  # the package exports a function too
    begin = tiny_en.tokenizer.timestamp_begin
    tokens = [begin, *tiny_en.tokenizer.encode(" Stop the music."), begin + 50]
    scored = ScoredWindow(tokens, -0.1, 0.01, ended=not at_limit)
    monkeypatch.setattr(module, "decode_scored", lambda model, mel, options, previous: [scored] * mel.shape[0])
    result = transcribe(tiny_en, faint(16000 * 4))
    if at_limit:
        assert len(result.tokens) == 4 and [s.start for s in result.segments] == [0.0, 1.0, 2.0, 3.0]
    else:
        assert len(result.tokens) == 1 and [(s.start, s.end) for s in result.segments] == [(0.0, 1.0)]
    assert result.text == " ".join(["Stop the music."] * len(result.tokens))


def test_a_sentence_across_30_s_is_transcribed_whole_by_seeking(tiny_en):
    """Speech from 28 s to 32 s: consecutive 30 s windows cut it (tiny.en then misheard most of it), while with
    timestamps the first window leaves that sentence's segment unfinished and the second resumes it."""
    (first_text, first), (across_text, across), (last_text, last) = speech_clips(3, seed=11)
    start = 28 * 16000
    audio = torch.cat([first, torch.zeros(start - first.numel()), across, torch.zeros(16000), last])
    def words_of(text: str) -> set[str]:
        return set("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())

    # The words only the sentence across the cut has, from the texts spoken, less the spelled-out numbers (the
    # model writes digits). Not from a transcript of the sentence alone: eSpeak's audio differs a little from
    # one process to the next, and one clean checkout's sentence alone came out as "two asked to not walk".
    numbers = words_of("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                       "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
                       "ninety hundred thousand")
    words = words_of(across_text) - words_of(first_text) - words_of(last_text) - numbers
    assert len(words) >= 4, across_text

    def heard(text: str) -> float:
        return len(words & words_of(text)) / len(words)

    seeking = transcribe(tiny_en, audio)
    cut = transcribe(tiny_en, audio, timestamps=False)
    assert heard(seeking.text) >= 0.75 and heard(cut.text) <= 0.5, (words, seeking.text, cut.text)
    assert heard(seeking.text) - heard(cut.text) >= 0.25
    assert len(seeking.tokens) == 2  # the second window starts 1 s before the cut sentence
    spanning = [s for s in seeking.segments if heard(s.text) >= 0.5]
    # It starts at most SEEK_LEAD_IN early: the model's first timestamp in a window is often <|0.00|>.
    assert len(spanning) == 1 and 27.0 <= spanning[0].start <= 28.5 and spanning[0].end > 30.0
    starts = [s.start for s in seeking.segments]
    assert starts == sorted(starts) and all(s.start <= s.end <= audio.numel() / 16000 for s in seeking.segments)
    assert seeking.text == " ".join(s.text for s in seeking.segments)
    assert [isinstance(s, Segment) for s in cut.segments] == [True, True]
    assert (cut.segments[0].start, cut.segments[1].start) == (0.0, 30.0)


def test_timestamps_must_be_a_bool_and_in_the_vocabulary(tiny_en):
    import dataclasses

    from dreidel.models.whisper import Whisper, WhisperRecognizer

    with pytest.raises(TypeError, match="timestamps must be a bool"):
        transcribe(tiny_en, torch.zeros(1600), timestamps=1)
    dims = dataclasses.replace(tiny_en.model.dims, n_vocab=tiny_en.tokenizer.timestamp_begin, n_audio_layer=1,
                               n_text_layer=1)
    no_timestamps = WhisperRecognizer(Whisper(dims).eval(), tiny_en.tokenizer, (), (), "no-timestamps")
    with pytest.raises(ValueError, match="has no timestamp tokens"):
        transcribe(no_timestamps, torch.zeros(1600))
    assert len(transcribe(no_timestamps, torch.zeros(1600), timestamps=False, max_new_tokens=2).tokens) == 1


def test_the_text_joins_the_segments_as_decoded():
    """openai-whisper's text is the decoded tokens joined: English segments bring their space, Japanese or Chinese
    ones none (the segments were joined with spaces, which put one between Japanese sentences)."""
    for decoded, text in [([" Hello.", " How are you?"], "Hello. How are you?"),
                          (["こんにちは。", "ありがとうございます。", "  "], "こんにちは。ありがとうございます。")]:
        progress = _Progress(torch.zeros(1), [])
        for index, piece in enumerate(decoded):
            progress.add_segment(float(index), index + 1.0, piece)
        assert progress.text == text
        assert [segment.text for segment in progress.segments] == [piece.strip() for piece in decoded if piece.strip()]
