"""Whisper's byte-level BPE tokenizer and its special tokens, on the shipped ``tokenizer.json`` (``tokenizers``)."""

from __future__ import annotations

import operator
from pathlib import Path

__all__ = ["WhisperTokenizer"]


# The largest tokenizer.json read: Whisper's are about 2 MB (a byte-pair vocabulary of 50k tokens); one of 72 MB
# took 1.1 GB to parse, and where memory ran out the Rust allocator aborted the process.
MAX_TOKENIZER_BYTES = 16 << 20


class WhisperTokenizer:
    """Text <-> token ids, plus the special tokens that build a decoding prompt.

    Args:
        path: a ``tokenizer.json`` (Hugging Face ``tokenizers`` format).
        multilingual: whether the model has language tokens in its prompt (51865-token vocabularies).
    """

    def __init__(self, path: str | Path, multilingual: bool) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer.json not found: {path}")
        self.path = path
        self.multilingual = bool(multilingual)
        size = path.stat().st_size
        if size > MAX_TOKENIZER_BYTES:  # parsed, a tokenizer takes ~16 times its size; out of memory, Rust aborts
            raise ValueError(f"{path}: {size} bytes, more than the {MAX_TOKENIZER_BYTES} a Whisper tokenizer.json "
                             "takes (about 2 MB)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a tokenizers tokenizer.json: {error}") from None
        self.eot = self._special("<|endoftext|>")
        self.sot = self._special("<|startoftranscript|>")
        self.transcribe = self._special("<|transcribe|>")
        self.translate = self._special("<|translate|>")
        self.no_timestamps = self._special("<|notimestamps|>")
        # <|0.00|>: the timestamp tokens follow <|notimestamps|>, one per 0.02 s up to <|30.00|> (in the model's
        # vocabulary; tokenizer.json files often leave them out, and decode() drops them either way).
        self.timestamp_begin = self.no_timestamps + 1
        # "<|nocaptions|>" up to large-v2, "<|nospeech|>" from large-v3: its probability at <|startoftranscript|>
        # is openai's no-speech probability.
        names = [t for t in ("<|nospeech|>", "<|nocaptions|>") if self._tokenizer.token_to_id(t) is not None]
        self.no_speech = self._special(names[0]) if names else None
        # <|startofprev|> opens the text a window is given before its prompt (an initial prompt, previous text).
        self.start_of_previous = self._tokenizer.token_to_id("<|startofprev|>")

    def _special(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.path} has no special token {token}")
        return token_id

    def language_token(self, language: str) -> int:
        """Id of ``<|language|>`` (e.g. "en", "de"); ``ValueError`` when the vocabulary has none."""
        token_id = self._tokenizer.token_to_id(f"<|{language}|>")
        if token_id is None or token_id <= self.sot or token_id >= self.translate:
            raise ValueError(f"language must be a Whisper language code such as 'en', got {language!r}")
        return token_id

    def prompt(self, language: str | None = "en", timestamps: bool = False) -> list[int]:
        """The start of every decode.

        English-only: ``<|startoftranscript|><|notimestamps|>``. Multilingual:
        ``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>`` (``language`` defaults to English).
        ``language`` is a Whisper language code ("en", "de", ...), in any case. With ``timestamps`` the prompt
        leaves out ``<|notimestamps|>``: the model then predicts timestamp tokens around each segment.
        """
        if not isinstance(timestamps, bool):
            raise TypeError(f"timestamps must be a bool, got {type(timestamps).__name__}")
        if language is not None:
            if not isinstance(language, str):
                raise TypeError(f"language must be a language code such as 'en' or None, got {type(language).__name__}")
            language = language.strip().lower()  # codes are case-insensitive: "EN" is "en"
        if not self.multilingual:
            if language not in (None, "en"):
                raise ValueError(f"this model is English-only; language must be 'en' or None, got {language!r}")
            start = [self.sot]
        else:
            start = [self.sot, self.language_token("en" if language is None else language), self.transcribe]
        return start if timestamps else start + [self.no_timestamps]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token(self, token_id: int) -> str:
        """The vocabulary's text of one token id (special tokens by name, e.g. "<|endoftext|>")."""
        return self._tokenizer.id_to_token(token_id)

    def decode(self, tokens: list[int]) -> str:
        """Text of ``tokens``; special and timestamp tokens (ids >= <|endoftext|>) are left out.

        Raises:
            TypeError: ``tokens`` holds something other than integer ids. ValueError: a negative id.
        """
        try:
            ids = [operator.index(t) for t in tokens]  # Python, NumPy and 0-d tensor integers; no floats
        except TypeError:
            raise TypeError(f"tokens must be a sequence of integer token ids, got {tokens!r:.80}") from None
        negative = [t for t in ids if t < 0]
        if negative:  # the Rust tokenizer raised OverflowError for them
            raise ValueError(f"tokens must be token ids >= 0, got {negative[0]}")
        return self._tokenizer.decode([t for t in ids if t < self.eot])
