"""Greedy and beam-search decoding of Whisper, with or without timestamps (Radford et al., 2022,
arXiv:2212.04356, §2.3 and §4.5).

Logit filters follow openai/whisper and transformers' Whisper generation: the checkpoint's ``suppress_tokens``
are masked at every step, and ``begin_suppress_tokens`` (the blank " " and <|endoftext|>) at the first sampled
step; with timestamps, the timestamp rules of ``_apply_timestamp_rules``. Sequences that finished keep emitting
<|endoftext|>, so a batch of audio windows decodes in lock step on one static cache.
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from dreidel.models.whisper.model import Whisper

__all__ = ["DecodingOptions", "ScoredWindow", "decode", "decode_scored"]


MAX_BEAM_SIZE = 64  # openai's default is 5


@dataclass(frozen=True)
class DecodingOptions:
    """What to decode and how.

    prompt: the start tokens (see ``WhisperTokenizer.prompt``); eot: <|endoftext|>.
    beam_size: 1 is greedy; k > 1 keeps k hypotheses per window and stops when k of them ended
    (openai's beam search with patience 1), ranked by sum of log-probabilities / length.
    max_new_tokens: cap on sampled tokens per window (openai uses n_text_ctx // 2 = 224).
    no_speech: the id of <|nocaptions|> (<|nospeech|> in newer vocabularies), or ``None``: each decoded window
    then also reports the model's probability of it right after <|startoftranscript|> (openai's no-speech
    probability; ``transcribe`` leaves out windows that score high on it and whose text is unsure).
    timestamp_begin: ``None`` decodes text only (the prompt then ends in <|notimestamps|>); else the id of
    <|0.00|>, the first of the timestamp tokens (one per 0.02 s of the window), and the decoding predicts them
    as Whisper was trained to: each segment of text opens and closes with one, under the rules of
    ``_apply_timestamp_rules``. The first may be at most ``max_initial_timestamp`` of them in (50: 1.0 s).
    Token ids are ints >= 0 (``decode`` checks them against the model's vocabulary); openai-whisper's -1 for its
    default suppressed symbols is refused.
    """

    prompt: tuple[int, ...]
    eot: int
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    beam_size: int = 1
    max_new_tokens: int = 224
    no_speech: int | None = None
    timestamp_begin: int | None = None
    max_initial_timestamp: int = 50

    def __post_init__(self) -> None:
        for name, ids in self._token_ids():
            _check_token_ids(name, ids)
        if not self.prompt:
            raise ValueError("prompt must hold at least <|startoftranscript|>")
        if (not isinstance(self.beam_size, numbers.Integral) or isinstance(self.beam_size, bool)
                or not 1 <= self.beam_size <= MAX_BEAM_SIZE):
            # the cap: the decoder's KV cache grows with batch x beams, and a huge beam is an out-of-memory crash
            raise ValueError(f"beam_size must be an int in [1, {MAX_BEAM_SIZE}], got {self.beam_size!r}")
        if (not isinstance(self.max_new_tokens, numbers.Integral) or isinstance(self.max_new_tokens, bool)
                or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for name in ("beam_size", "max_new_tokens"):  # numpy's ints too, kept as Python ints (frozen: by hand)
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.timestamp_begin is not None:
            if (not isinstance(self.timestamp_begin, int) or isinstance(self.timestamp_begin, bool)
                    or self.timestamp_begin <= self.eot):
                raise ValueError(f"timestamp_begin must be None or the id of <|0.00|>, above <|endoftext|> "
                                 f"({self.eot}), got {self.timestamp_begin!r}")
            if self.timestamp_begin - 1 in self.prompt:
                raise ValueError("a prompt that decodes timestamps must not hold <|notimestamps|>")
        if (not isinstance(self.max_initial_timestamp, int) or isinstance(self.max_initial_timestamp, bool)
                or self.max_initial_timestamp < 0):
            raise ValueError(f"max_initial_timestamp must be an int >= 0, got {self.max_initial_timestamp!r}")

    def _token_ids(self) -> list[tuple[str, tuple[int, ...]]]:
        """(argument name, the token ids it holds) for every argument that holds ids."""
        return [("prompt", self.prompt), ("eot", (self.eot,)), ("suppress_tokens", self.suppress_tokens),
                ("begin_suppress_tokens", self.begin_suppress_tokens),
                ("no_speech", () if self.no_speech is None else (self.no_speech,))]


def _check_token_ids(name: str, ids) -> None:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a tuple of token ids, got {type(ids).__name__} {ids!r}")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
            shorthand = (" (openai-whisper's shorthand for its default set of symbol tokens, which dreidel does not "
                         "expand: give the ids; load() reads them from the model's config.json)") if token == -1 else ""
            raise ValueError(f"{name}: expected token ids (ints >= 0), got {token!r}{shorthand}")


def _suppression_bias(tokens: tuple[int, ...], n_vocab: int, like: Tensor) -> Tensor:
    bias = torch.zeros(n_vocab, dtype=like.dtype, device=like.device)
    bias[list(tokens)] = float("-inf")
    return bias  # (V,)


def _apply_timestamp_rules(logits: Tensor, history: list[list[int]], options: DecodingOptions) -> None:
    """Mask, in place, the tokens each row of ``logits`` (R, V) may not sample next when decoding timestamps,
    given the tokens each row sampled so far (``history``, R lists; prompt excluded).

    The rules Whisper's timestamp prediction needs (Radford et al. 2022, §2.3; as openai/whisper's decoder
    applies them): never <|notimestamps|>; the first token is a timestamp of at most ``max_initial_timestamp``;
    timestamps come in pairs, the end of a segment then the start of the next, so after a lone timestamp comes
    another or <|endoftext|>, and after a pair comes text or <|endoftext|>; timestamps never go back, and a
    segment's end lies after its start (a segment of no length could loop forever); and where the timestamps
    together are likelier than any single other token, a timestamp it is.
    """
    begin = options.timestamp_begin
    logits[:, begin - 1] = float("-inf")
    for row, sampled in enumerate(history):
        row_logits = logits[row]
        if not sampled:
            row_logits[:begin] = float("-inf")
            row_logits[begin + options.max_initial_timestamp + 1:] = float("-inf")
            continue
        last_is_time = sampled[-1] >= begin
        pair = last_is_time and (len(sampled) < 2 or sampled[-2] >= begin)
        if pair:
            row_logits[begin:] = float("-inf")  # text (or the end) follows a pair
        elif last_is_time:  # a lone timestamp: another (or the end) follows
            row_logits[:options.eot] = float("-inf")
            row_logits[options.eot + 1:begin] = float("-inf")
        times = [t for t in sampled if t >= begin]
        if times and not pair:
            # A segment's start may equal the previous end; its end must come after its start.
            row_logits[begin:times[-1] + (0 if last_is_time else 1)] = float("-inf")
    logprobs = logits.float().log_softmax(-1)
    timestamps_likelier = logprobs[:, begin:].logsumexp(-1) > logprobs[:, :begin].max(-1).values
    logits[timestamps_likelier, :begin] = float("-inf")


def sampling_limit(model: Whisper, options: DecodingOptions, prompt_length: int | None = None) -> int:
    """How many tokens a window may sample: ``max_new_tokens``, within what the text context leaves after the
    prompt (``options.prompt``, or ``prompt_length`` tokens with the previous text in front of it)."""
    return min(options.max_new_tokens, model.dims.n_text_ctx - (prompt_length or len(options.prompt)))


@torch.inference_mode()
def decode(model: Whisper, mel: Tensor, options: DecodingOptions,
           previous: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """Sampled tokens (prompt excluded, up to and without <|endoftext|>) for each window of ``mel``.

    mel: (B, n_mels, 3000) float log-mel of B 30-second windows. previous: see ``decode_scored``.
    """
    return [window.tokens for window in decode_scored(model, mel, options, previous)]


class ScoredWindow(NamedTuple):
    """One decoded window: its sampled tokens (prompt excluded, up to and without <|endoftext|>), their average
    log-probability (the sum over the sampled tokens and the <|endoftext|> that ended them, divided by their
    count: openai/whisper's ``avg_logprob``), the no-speech probability (see ``DecodingOptions.no_speech``;
    ``None`` without that token), and whether the tokens ended with <|endoftext|> (False: they stopped at the
    sampling limit)."""

    tokens: list[int]
    average_logprob: float
    no_speech_prob: float | None
    ended: bool = True


@torch.inference_mode()
def decode_scored(model: Whisper, mel: Tensor, options: DecodingOptions,
                  previous: Sequence[Sequence[int]] | None = None) -> list[ScoredWindow]:
    """``decode``'s tokens of each window with their scores (mel as for ``decode``).

    previous: ``None``, or for each window the tokens that go before its prompt: <|startofprev|> and the text
    before the window (openai-whisper's ``prompt``: an initial prompt or the previous windows' tokens; Radford
    et al. 2022, §2.3), or nothing (an empty sequence). Windows whose prompts then differ in length decode
    together, left-padded (see ``DecoderCache``; the prompts themselves go through the decoder in groups of one
    length, so that no layer sees padding), each up to its own sampling limit (``sampling_limit`` of its
    prompt): a window's tokens equal those it decodes alone, and its scores to rounding.

    Raises ``TypeError`` for a mel that is not a floating-point tensor, ``ValueError`` for one that is not
    (batch, n_mels, frames) with at least one window or holds NaN or infinite values, for a
    token id of ``options`` or ``previous`` past the model's vocabulary (naming the argument), and for
    ``previous`` of another length than the batch or too long for the text context.
    """
    if not isinstance(mel, torch.Tensor):
        raise TypeError(f"mel must be a torch.Tensor (from log_mel_spectrogram), got {type(mel).__name__}")
    if not isinstance(options, DecodingOptions):
        raise TypeError(f"options must be a DecodingOptions (recognizer.options(...)), got {type(options).__name__}")
    if not mel.is_floating_point():
        raise TypeError(f"mel must be a floating-point log-mel spectrogram (log_mel_spectrogram), got {mel.dtype}")
    if mel.dim() != 3 or mel.shape[0] == 0:
        raise ValueError(f"mel must be (batch, n_mels, frames) with batch >= 1, got shape {tuple(mel.shape)}")
    if not bool(torch.isfinite(mel).all()):  # a NaN window decoded as a run of "!" tokens
        raise ValueError("mel has NaN or infinite values")
    n_vocab = model.dims.n_vocab
    previous = _checked_previous(previous, mel.shape[0], n_vocab)
    if options.timestamp_begin is not None and options.timestamp_begin >= n_vocab:
        raise ValueError(f"timestamp_begin {options.timestamp_begin} is past the model's vocabulary of "
                         f"{n_vocab} tokens: it has no timestamp tokens there")
    for name, ids in options._token_ids():
        past = [token for token in ids if token >= n_vocab]
        if past:
            raise ValueError(f"{name} {past[0]} is not a token of the model's vocabulary of {n_vocab} "
                             f"(ids 0 to {n_vocab - 1})")
    # Each window samples up to its own limit: windows are decoded in groups of one limit (one group unless a
    # prompt is long enough to shorten it), each group left-padded to its longest prompt, longest first.
    limits = [sampling_limit(model, options, len(ids) + len(options.prompt)) for ids in previous]
    if min(limits) < 1:
        longest = max(len(ids) for ids in previous) + len(options.prompt)
        raise ValueError(f"prompt of {longest} tokens leaves no room in the text context of {model.dims.n_text_ctx}")
    weights = model.decoder.positional_embedding  # mel moves to the model's device and dtype
    features = model.embed_audio(mel.to(device=weights.device, dtype=weights.dtype))  # (B, 1500, C)
    decode_group = _greedy if options.beam_size == 1 else _beam_search
    results: list[ScoredWindow | None] = [None] * mel.shape[0]
    for limit in sorted(set(limits)):
        group = sorted((i for i, own in enumerate(limits) if own == limit), key=lambda i: -len(previous[i]))
        chosen = features if len(group) == mel.shape[0] and group == sorted(group) else features[group]
        for i, window in zip(group, decode_group(model, chosen, options, limit,
                                                 _prompts(options, [previous[i] for i in group]))):
            results[i] = window
    return results


class _Prompts(NamedTuple):
    """Each window's full prompt (previous text, then ``DecodingOptions.prompt``), left-padded to one length,
    and the padding of each window (``None`` where no window is padded)."""

    tokens: list[list[int]]
    padding: list[int] | None

    @property
    def length(self) -> int:
        return len(self.tokens[0])


def _checked_previous(previous: Sequence[Sequence[int]] | None, batch: int, n_vocab: int) -> list[list[int]]:
    """``previous`` (see ``decode_scored``) as lists of ids, one per window (empty where ``None``), checked."""
    if previous is None:
        return [[] for _ in range(batch)]
    if isinstance(previous, (str, bytes)) or not isinstance(previous, Sequence) or len(previous) != batch:
        raise ValueError(f"previous must be a sequence of one token sequence per window ({batch}), got "
                         f"{type(previous).__name__}" + (f" of length {len(previous)}"
                                                         if isinstance(previous, Sequence) else ""))
    for window, ids in enumerate(previous):
        _check_token_ids(f"previous[{window}]", ids)
        past = [token for token in ids if token >= n_vocab]
        if past:
            raise ValueError(f"previous[{window}]: {past[0]} is not a token of the model's vocabulary of {n_vocab}")
    return [list(ids) for ids in previous]


def _prompts(options: DecodingOptions, previous: list[list[int]]) -> _Prompts:
    """The full prompts of windows after ``previous`` (longest first), left-padded with <|endoftext|>."""
    longest = max(len(ids) for ids in previous)
    padding = [longest - len(ids) for ids in previous]
    tokens = [[options.eot] * pad + ids + list(options.prompt) for pad, ids in zip(padding, previous)]
    return _Prompts(tokens, padding if any(padding) else None)


def _prompt_states(model: Whisper, prompts: _Prompts, cache, rows_per_window: int, device) -> Tensor:
    """The decoder's states (R, P, C) over each row's prompt, its key/values written to ``cache``. Windows of
    one padding (consecutive: longest prompt first) go through the decoder together, from their first real
    token: no layer sees a row's padding, whose states stay zero (a layer that scales each window by its own
    activations, as ``quantize_int8``'s do, would otherwise see the padding too)."""
    tokens = torch.tensor(prompts.tokens, device=device).repeat_interleave(rows_per_window, dim=0)  # (R, P)
    if prompts.padding is None:
        return model.decoder.hidden(tokens, 0, cache)
    states = None
    first = 0
    for pad, run in itertools.groupby(prompts.padding):
        last = first + len(list(run))
        rows = slice(first * rows_per_window, last * rows_per_window)
        part = model.decoder.hidden(tokens[rows, pad:], pad, cache.windows(first, last, rows_per_window))
        if states is None:
            states = part.new_zeros(tokens.shape[0], tokens.shape[1], part.shape[-1])
        states[rows, pad:] = part
        first = last
    return states


def _no_speech_probabilities(model: Whisper, prompt_states: Tensor, options: DecodingOptions) -> list[float | None]:
    """Each window's probability of ``no_speech`` from the decoder's states (B, P, C) over its prompt, at
    <|startoftranscript|> (``options.prompt``'s first token, after any previous text: causal attention makes
    it independent of the rest of the prompt), before any suppression, as openai/whisper takes it."""
    if options.no_speech is None:
        return [None] * prompt_states.shape[0]
    start = prompt_states.shape[1] - len(options.prompt)
    logits = model.decoder.project(prompt_states[:, start]).float()  # (B, V)
    return logits.softmax(dim=-1)[:, options.no_speech].tolist()


def _new_cache(model: Whisper, features: Tensor, prompts: _Prompts, rows_per_window: int = 1):
    padding = None if prompts.padding is None else torch.tensor(prompts.padding, dtype=torch.int64)
    return model.decoder.new_cache(features, rows_per_window=rows_per_window, padding=padding)


def _greedy(model: Whisper, features: Tensor, options: DecodingOptions, max_new: int,
            prompts: _Prompts | None = None) -> list[ScoredWindow]:
    """Greedy decoding of each window of ``features`` (B, S, C) after its prompt (``options.prompt`` if none)."""
    decoder = model.decoder
    batch = features.shape[0]
    prompts = prompts or _prompts(options, [[]] * batch)
    n_vocab = model.dims.n_vocab
    cache = _new_cache(model, features, prompts)
    device = features.device
    states = _prompt_states(model, prompts, cache, 1, device)  # (B, P, C)
    no_speech = _no_speech_probabilities(model, states, options)
    hidden = states[:, -1]  # (B, C)
    suppress = _suppression_bias(options.suppress_tokens, n_vocab, hidden)
    first_suppress = _suppression_bias(options.suppress_tokens + options.begin_suppress_tokens, n_vocab, hidden)
    sampled = torch.full((batch, max_new), options.eot, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    sum_logprobs = torch.zeros(batch, dtype=torch.float64, device=device)
    counted = torch.zeros(batch, dtype=torch.long, device=device)  # tokens scored: sampled ones and the eot
    offset = prompts.length
    history: list[list[int]] = [[] for _ in range(batch)]  # what each window sampled (for the timestamp rules)
    for step in range(max_new):
        logits = (decoder.project(hidden) + (first_suppress if step == 0 else suppress)).float()  # (B, V)
        if options.timestamp_begin is not None:
            _apply_timestamp_rules(logits, history, options)
        next_tokens = logits.argmax(-1)  # (B,)
        chosen = logits.gather(-1, next_tokens[:, None])[:, 0] - logits.logsumexp(-1)  # its log-probability
        live = ~finished
        sum_logprobs += torch.where(live, chosen.double(), 0.0)
        counted += live.long()
        next_tokens.masked_fill_(finished, options.eot)
        sampled[:, step] = next_tokens
        if options.timestamp_begin is not None:
            for row, token in zip(history, next_tokens.tolist()):
                row.append(token)
        finished |= next_tokens == options.eot
        if bool(finished.all()) or step + 1 == max_new:
            break
        hidden = decoder.hidden(next_tokens[:, None], offset + step, cache)[:, -1]
    averages = (sum_logprobs / counted.clamp_min(1)).tolist()
    return [ScoredWindow(_until_eot(row, options.eot), average, p, options.eot in row)
            for row, average, p in zip(sampled.tolist(), averages, no_speech)]


def _until_eot(tokens: list[int], eot: int) -> list[int]:
    return tokens[: tokens.index(eot)] if eot in tokens else tokens


def _beam_search(model: Whisper, features: Tensor, options: DecodingOptions, max_new: int,
                 prompts: _Prompts | None = None) -> list[ScoredWindow]:
    """Beam search (``options.beam_size``) on each window of ``features`` (B, S, C) after its prompt (as
    ``_greedy``)."""
    decoder = model.decoder
    batch, beams = features.shape[0], options.beam_size
    prompts = prompts or _prompts(options, [[]] * batch)
    cache = _new_cache(model, features, prompts, rows_per_window=beams)  # rows: window-major, beam-minor
    device = features.device
    states = _prompt_states(model, prompts, cache, beams, device)  # (B*K, P, C)
    no_speech = _no_speech_probabilities(model, states[::beams], options)
    logits = decoder.project(states[:, -1])  # (B*K, V)
    suppress = _suppression_bias(options.suppress_tokens, logits.shape[-1], logits)
    first_suppress = _suppression_bias(options.suppress_tokens + options.begin_suppress_tokens,
                                       logits.shape[-1], logits)
    hypotheses: list[list[int]] = [[] for _ in range(batch * beams)]
    sum_logprobs = [0.0] * (batch * beams)
    finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(batch)]
    done = [False] * batch
    offset = prompts.length
    for step in range(max_new):
        logits = logits.float() + (first_suppress if step == 0 else suppress)
        if options.timestamp_begin is not None:
            _apply_timestamp_rules(logits, hypotheses, options)
        logprobs = torch.log_softmax(logits, dim=-1)
        top_logprobs, top_tokens = logprobs.topk(beams + 1, dim=-1)  # (B*K, K+1)
        top_logprobs, top_tokens = top_logprobs.tolist(), top_tokens.tolist()
        source_rows, new_hypotheses, new_sums = [], [], []
        for window in range(batch):
            rows = range(window * beams, (window + 1) * beams)
            if done[window]:
                source_rows += rows
                new_hypotheses += [hypotheses[r] + [options.eot] for r in rows]
                new_sums += [sum_logprobs[r] for r in rows]
                continue
            candidates: dict[tuple[int, ...], tuple[float, int]] = {}
            # At step 0 all beams are the same prompt; looking at the first row avoids duplicate candidates.
            for row in (rows[:1] if step == 0 else rows):
                for logprob, token in zip(top_logprobs[row], top_tokens[row]):
                    sequence = tuple(hypotheses[row]) + (token,)
                    score = sum_logprobs[row] + logprob
                    if sequence not in candidates or candidates[sequence][0] < score:
                        candidates[sequence] = (score, row)
            kept = 0
            for sequence, (score, row) in sorted(candidates.items(), key=lambda item: -item[1][0]):
                if sequence[-1] == options.eot:
                    if len(finished[window]) < beams:
                        finished[window][sequence[:-1]] = score
                elif kept < beams:
                    source_rows.append(row)
                    new_hypotheses.append(list(sequence))
                    new_sums.append(score)
                    kept += 1
                if kept == beams:
                    break
            done[window] = len(finished[window]) >= beams
        hypotheses, sum_logprobs = new_hypotheses, new_sums
        if all(done) or step + 1 == max_new:
            break
        index = torch.tensor(source_rows, device=device)
        cache.reorder(index, offset + step)
        last = torch.tensor([h[-1] for h in hypotheses], device=device)
        logits = decoder(last[:, None], offset + step, cache)[:, -1]
    results = []
    for window in range(batch):
        pool = dict(finished[window])
        live = sorted(range(window * beams, (window + 1) * beams), key=lambda r: -sum_logprobs[r])
        for row in live:  # ran out of steps: live hypotheses fill the pool, as in openai/whisper
            if len(pool) >= beams:
                break
            pool.setdefault(tuple(hypotheses[row]), sum_logprobs[row])
        best = max(pool.items(), key=lambda item: item[1] / max(len(item[0]), 1))
        tokens = _until_eot(list(best[0]), options.eot)
        ended = best[0] in finished[window]  # its score then includes the <|endoftext|>'s log-probability
        results.append(ScoredWindow(tokens, best[1] / max(len(tokens) + ended, 1), no_speech[window], ended))
    return results
