"""Text before a window's prompt (<|startofprev|> ...): an initial prompt, or the previous windows' text."""

from __future__ import annotations

import dataclasses
import importlib
import warnings

import pytest
import torch
from _whisper_helpers import faint, mel_of, speech_clips

from dreidel.models.whisper import DecodingOptions, decode, transcribe
from dreidel.models.whisper.decoding import ScoredWindow, decode_scored

# The package exports a function named like the module.
transcribe_module = importlib.import_module("dreidel.models.whisper.transcribe")

RANDOM_OPTIONS = DecodingOptions(prompt=(50257, 50362), eot=50256, suppress_tokens=(1, 2, 50257),
                                 begin_suppress_tokens=(220, 50256), max_new_tokens=10, no_speech=50361)
START_OF_PREVIOUS = 50360


def hf_greedy_after(recognizer, hf, mel: torch.Tensor, previous: list[int]) -> list[int]:
    """transformers' generate, greedy, no timestamps, given ``previous`` (<|startofprev|> ...) as prompt_ids."""
    from transformers import GenerationConfig

    tokenizer = recognizer.tokenizer
    config = GenerationConfig(decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot,
                              pad_token_id=tokenizer.eot, no_timestamps_token_id=tokenizer.no_timestamps,
                              is_multilingual=False, suppress_tokens=list(recognizer.suppress_tokens),
                              begin_suppress_tokens=list(recognizer.begin_suppress_tokens), max_new_tokens=100,
                              num_beams=1, do_sample=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generated = hf.generate(mel[None], generation_config=config, prompt_ids=torch.tensor(previous))
    return [t for t in generated[0].tolist() if t != tokenizer.eot]


def test_windows_after_previous_texts_of_different_lengths_equal_transformers(tiny_en, tiny_en_hf):
    """Three windows decoded together, each after its own previous text (none, short, long: left-padded to one
    length), give the tokens transformers' generate gives each alone with that text as its prompt_ids."""
    tokenizer = tiny_en.tokenizer
    clips = speech_clips(3, seed=1)
    mel = torch.stack([mel_of(audio) for _, audio in clips])
    previous = [[], [tokenizer.start_of_previous, *tokenizer.encode(" Hello there.")],
                [tokenizer.start_of_previous, *tokenizer.encode(" The river, the bridge and the 1890s: a story.")]]
    ours = decode(tiny_en.model, mel, tiny_en.options(max_new_tokens=100), previous)
    for window, (text, _) in enumerate(clips):
        theirs = (hf_greedy_after(tiny_en, tiny_en_hf, mel[window], previous[window]) if previous[window]
                  else decode(tiny_en.model, mel[window:window + 1], tiny_en.options(max_new_tokens=100))[0])
        assert ours[window] == theirs, text
        assert ours[window], text


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("timestamps", [False, True])
@torch.inference_mode()
def test_padding_does_not_change_a_window(random_whisper, beam_size, timestamps):
    """A random model (whose tokens depend on every position): each window decoded in a batch of previous texts
    of 0, 3, 7 and 55 tokens scores as it does alone, unpadded, and samples up to its own limit (the 55 leave
    room for 7 of the 10 tokens asked in the 64 positions: the others still sample 10)."""
    options = dataclasses.replace(RANDOM_OPTIONS, beam_size=beam_size,
                                  prompt=(50257,) if timestamps else RANDOM_OPTIONS.prompt,
                                  timestamp_begin=50363 if timestamps else None)
    mel = torch.randn(4, 80, 3000, generator=torch.Generator().manual_seed(5))
    previous = [[], [START_OF_PREVIOUS, 11, 12], [START_OF_PREVIOUS, 21, 22, 23, 24, 25, 26],
                [START_OF_PREVIOUS, *range(100, 154)]]
    together = decode_scored(random_whisper, mel, options, previous)
    assert not together[3].ended and len(together[3].tokens) == 64 - len(options.prompt) - 55
    assert together[0].ended or len(together[0].tokens) == options.max_new_tokens
    for window in range(4):
        alone, = decode_scored(random_whisper, mel[window:window + 1], options, [previous[window]])
        assert together[window].tokens == alone.tokens
        assert together[window].average_logprob == pytest.approx(alone.average_logprob, abs=1e-5)
        assert together[window].no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-5)
        assert together[window].ended == alone.ended
    # and the previous text matters: the same windows without it score otherwise
    plain = decode_scored(random_whisper, mel, options)
    assert [w.no_speech_prob for w in plain][1:] != pytest.approx([w.no_speech_prob for w in together][1:])


def test_an_int8_window_does_not_depend_on_the_padding_of_its_batch(tiny_en):
    """quantize_int8 scales each window's activations by their own largest value: a window with no previous text
    decoded beside one with a long previous text (so left-padded) gives the tokens and score it gives alone (a
    review found "Let me make your wake up at 4am" alone and "Let's make our wake up" padded, when the
    prompt pass ran over the padding). The score is compared to 5e-3, not to float rounding: the padded window's
    attention sums run over longer rows, and on AVX-512 (Zen 4) that rounding can flip an activation's int8
    rounding (measured 1.4e-3 apart, same tokens)."""
    from dreidel.models.whisper import quantize_int8

    recognizer = quantize_int8(tiny_en)
    tokenizer = recognizer.tokenizer
    mel = torch.stack([mel_of(audio) for _, audio in speech_clips(2, seed=2)])
    previous = [[], [tokenizer.start_of_previous,
                     *tokenizer.encode(" The river, the bridge and the 1890s: a story of Mr. Smith's town.")]]
    options = recognizer.options(timestamps=True, max_new_tokens=60)
    alone, = decode_scored(recognizer.model, mel[:1], options)
    together = decode_scored(recognizer.model, mel, options, previous)[0]
    assert together.tokens == alone.tokens
    assert together.average_logprob == pytest.approx(alone.average_logprob, abs=5e-3)


@torch.inference_mode()
def test_greedy_after_previous_text_equals_teacher_forcing(random_whisper):
    """Each greedy token is the arg-max of the model's logits over the whole sequence so far (previous text,
    prompt, tokens) computed without the cache, the suppressed tokens masked."""
    options = RANDOM_OPTIONS
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(6))
    previous = [[START_OF_PREVIOUS, 31, 32, 33], [START_OF_PREVIOUS]]
    windows = decode_scored(random_whisper, mel, options, previous)
    features = random_whisper.embed_audio(mel)
    for window, result in enumerate(windows):
        sequence = [*previous[window], *options.prompt]
        sampled: list[int] = []
        while len(sampled) < options.max_new_tokens:
            logits = random_whisper.logits(torch.tensor([sequence + sampled]), features[window:window + 1])[0, -1]
            masked = list(options.suppress_tokens) + (list(options.begin_suppress_tokens) if not sampled else [])
            logits[masked] = float("-inf")
            token = int(logits.argmax())
            if token == options.eot:
                break
            sampled.append(token)
        assert result.tokens == sampled
        assert result.ended == (len(sampled) < options.max_new_tokens)


@pytest.mark.parametrize("previous, error, message", [
    ([[START_OF_PREVIOUS]], ValueError, r"one token sequence per window \(2\), got list of length 1"),
    ("text", ValueError, r"one token sequence per window \(2\), got str"),
    ([[START_OF_PREVIOUS], "abc"], TypeError, r"previous\[1\] must be a tuple of token ids"),
    ([[START_OF_PREVIOUS], [-1]], ValueError, r"previous\[1\]: expected token ids \(ints >= 0\), got -1"),
    ([[START_OF_PREVIOUS], [60000]], ValueError, r"previous\[1\]: 60000 is not a token of the model's vocabulary"),
    ([[START_OF_PREVIOUS] * 70, []], ValueError, r"prompt of 72 tokens leaves no room in the text context of 64"),
    ([[START_OF_PREVIOUS] * 62, []], ValueError, r"prompt of 64 tokens leaves no room in the text context of 64"),
])
def test_previous_text_is_checked(random_whisper, previous, error, message):
    with pytest.raises(error, match=message):
        decode_scored(random_whisper, torch.zeros(2, 80, 3000), RANDOM_OPTIONS, previous)


def test_padding_of_the_wrong_shape_is_refused(random_whisper):
    features = torch.zeros(2, 1500, random_whisper.dims.n_audio_state)
    for padding in (torch.zeros(3, dtype=torch.int64), torch.tensor([0, -1]), torch.zeros(2)):
        with pytest.raises(ValueError, match=r"padding must be \(windows,\) = \(2,\) int64 counts >= 0"):
            random_whisper.decoder.new_cache(features, padding=padding)


def _recording_decoder(monkeypatch, tiny_en, texts: list[str], average_logprob: float = -0.2):
    """Replace decode_scored with one that records each window's previous text and answers, window after window,
    a segment of ``texts[i]`` from 0 s to 30 s (with timestamps) or that text (without)."""
    tokenizer, begin = tiny_en.tokenizer, tiny_en.tokenizer.timestamp_begin
    seen: list[list[int]] = []

    def fake_decode_scored(model, mel, options, previous):
        results = []
        for window in range(mel.shape[0]):
            seen.append([] if previous is None else list(previous[window]))
            text = tokenizer.encode(texts[min(len(seen) - 1, len(texts) - 1)])
            tokens = [begin, *text, begin + 1500] if options.timestamp_begin is not None else text
            results.append(ScoredWindow(tokens, average_logprob, 0.01))
        return results

    monkeypatch.setattr(transcribe_module, "decode_scored", fake_decode_scored)
    return seen


@pytest.mark.parametrize("timestamps", [True, False])
@pytest.mark.parametrize("condition", [True, False])
def test_the_initial_prompt_and_the_previous_text_reach_the_windows(tiny_en, monkeypatch, timestamps, condition):
    """openai-whisper's rule: the first window follows <|startofprev|> and " " + the initial prompt; with
    condition_on_previous_text each later window follows that and every earlier window's tokens (timestamps
    included), without it nothing."""
    tokenizer = tiny_en.tokenizer
    seen = _recording_decoder(monkeypatch, tiny_en, [" One.", " Two.", " Three."])
    result = transcribe(tiny_en, faint(16000 * 70), initial_prompt="  Glossary: dreidel. ",
                        condition_on_previous_text=condition, timestamps=timestamps, fallback=False)
    assert result.text == "One. Two. Three."
    prompt = [tokenizer.start_of_previous, *tokenizer.encode(" Glossary: dreidel.")]
    assert seen[0] == prompt
    if condition:
        assert seen[1] == prompt + list(result.tokens[0])
        assert seen[2] == prompt + list(result.tokens[0]) + list(result.tokens[1])
    else:
        assert seen[1:] == [[], []]


@pytest.mark.parametrize("timestamps", [True, False])
def test_the_initial_prompt_waits_for_the_first_window_with_sound(tiny_en, monkeypatch, timestamps):
    """30 s of digital silence (not decoded), then sound: the first window decoded follows the initial prompt,
    as in openai-whisper (a window left out does not use it up)."""
    tokenizer = tiny_en.tokenizer
    seen = _recording_decoder(monkeypatch, tiny_en, [" One.", " Two."])
    audio = torch.cat([torch.zeros(16000 * 30), faint(16000 * 40)])
    transcribe(tiny_en, audio, initial_prompt="Glossary: dreidel.", timestamps=timestamps, fallback=False)
    assert seen[0] == [tokenizer.start_of_previous, *tokenizer.encode(" Glossary: dreidel.")]
    assert seen[1] == []


def test_a_window_that_fails_the_tests_is_not_carried_on(tiny_en, monkeypatch):
    """A looping text (gzip ratio above 2.4) is not given to the next window, as openai-whisper drops the prompt
    after a window it decoded at a high temperature."""
    loop = " Stop it." * 30
    seen = _recording_decoder(monkeypatch, tiny_en, [" One.", loop, " Three.", " Four."])
    transcribe(tiny_en, faint(16000 * 100), condition_on_previous_text=True, fallback=False)
    assert seen[1] and seen[2] == [] and seen[3] != []


def test_the_previous_text_is_cut_to_half_the_context(tiny_en, monkeypatch):
    """Only the last n_text_ctx // 2 - 1 tokens (223 for tiny.en) go before the prompt, after <|startofprev|>."""
    from dreidel.data.speech import speech_test_set

    text = " " + " ".join(item.text for item in speech_test_set(12, seed=3))  # not a loop: it passes the tests
    seen = _recording_decoder(monkeypatch, tiny_en, [text])
    result = transcribe(tiny_en, faint(16000 * 100), condition_on_previous_text=True, fallback=False)
    window = len(result.tokens[0])
    assert 100 < window < 200
    assert [len(previous) for previous in seen] == [0, 1 + window, 1 + 223, 1 + 223]
    assert all(previous[0] == tiny_en.tokenizer.start_of_previous for previous in seen[1:])
    assert seen[3][1:] == (list(result.tokens[0]) * 3)[-223:]


@pytest.mark.parametrize("keyword, value, error, message", [
    ("initial_prompt", 5, TypeError, "initial_prompt must be a str or None, got int"),
    ("initial_prompt", " \n", ValueError, "initial_prompt must hold some text"),
    ("condition_on_previous_text", "yes", TypeError, "condition_on_previous_text must be a bool, got str"),
    # the tokenizer reads special-token text as the token itself; openai-whisper and transformers refuse it
    ("initial_prompt", "Notes <|endoftext|> more", ValueError,
     r"initial_prompt must be plain text, but it holds the special token <\|endoftext\|>"),
    ("initial_prompt", "<|notimestamps|> hello", ValueError, r"holds the special token <\|notimestamps\|>"),
    # bytes of a command line that are not UTF-8 (os.fsdecode(b"caf\xe9")): the tokenizer said only "TextInputSequence
    # must be str"
    ("initial_prompt", "caf\udce9", ValueError, r"initial_prompt must be valid text, but character 3 is '\\udce9'"),
])
def test_prompt_arguments_are_checked(tiny_en, keyword, value, error, message):
    with pytest.raises(error, match=message):
        transcribe(tiny_en, torch.zeros(16000), **{keyword: value})


def test_a_model_without_startofprev_refuses_previous_text_before_decoding(tiny_en, monkeypatch):
    import copy
    import dataclasses

    tokenizer = copy.copy(tiny_en.tokenizer)
    tokenizer.start_of_previous = None
    recognizer = dataclasses.replace(tiny_en, tokenizer=tokenizer)
    seen = _recording_decoder(monkeypatch, tiny_en, [" One."])
    for keyword, value in (("condition_on_previous_text", True), ("initial_prompt", "Hello.")):
        with pytest.raises(ValueError, match=f"{keyword}: .* has no <\\|startofprev\\|> token"):
            transcribe(recognizer, faint(16000), **{keyword: value})
    assert seen == []


def test_a_long_input_conditioned_on_its_previous_text(tiny_en):
    """Real speech over two windows, each given the text before it: every sentence is heard (most of its
    words), as without the previous text."""
    clips = speech_clips(3, seed=11)
    audio = torch.cat([torch.cat([clip, torch.zeros(8 * 16000)]) for _, clip in clips])
    assert audio.numel() > 30 * 16000

    def words_of(text: str) -> set[str]:
        return set("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())

    # spelled-out numbers are left out: the model writes digits
    numbers = words_of("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                       "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
                       "ninety hundred thousand")
    conditioned = transcribe(tiny_en, audio, condition_on_previous_text=True)
    assert len(conditioned.tokens) >= 2
    heard = words_of(conditioned.text)
    for text, _ in clips:
        words = words_of(text) - numbers
        assert len(words & heard) >= 0.6 * len(words), (text, conditioned.text)
