"""benchmarks/whisper.py's WER normaliser: a recogniser's digits and the references' words come out the same."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "whisper.py"


def load_script():
    """The benchmark script as a module, without leaving benchmarks/ on sys.path (the script puts it there for
    its own `_report` import; its fwht.py and whisper.py would otherwise shadow other modules)."""
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("benchmark_whisper", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


bench = load_script()


@pytest.mark.parametrize(("digits", "words"), [
    # tiny.en's transcripts of eSpeak reading sentences.txt (left) against the sentence (right)
    ("The train from London to Edinburgh takes about 4.5 hours.",
     "The train from London to Edinburgh takes about four and a half hours."),
    ("The museum opens on Tuesday, the 4th of March.", "The museum opens on Tuesday, the fourth of March."),
    ("The bridge over the river was built in 1890.", "The bridge over the river was built in eighteen ninety."),
    ("In 1969, two astronauts walked on the moon.", "In nineteen sixty nine, two astronauts walked on the moon."),
    ("Emma was born on the 23rd of August, 2001.",
     "Emma was born on the twenty third of August, two thousand and one."),
    ("My train leaves at 715 tomorrow morning.", "My train leaves at seven fifteen tomorrow morning."),
    ("The farmer counted 100 and 12 sheep in the field.",
     "The farmer counted one hundred and twelve sheep in the field."),
    ("The farmer counted 112 sheep in the field.", "The farmer counted one hundred and twelve sheep in the field."),
    ("The price of the ticket went up from $20 to 25.",
     "The price of the ticket went up from twenty dollars to twenty five."),
    ("The concert starts at 8 o'clock, so we should leave at 7.",
     "The concert starts at eight o'clock, so we should leave at seven."),
    ("The store offers a 10% discount to students.", "The store offers a ten percent discount to students."),
    ("The factory produces about 2,000 cars every week.", "The factory produces about two thousand cars every week."),
    ("She planted 42 tulips.", "She planted forty-two tulips."),
    # the other forms the normaliser reads
    ("1st 2nd 3rd 5th 8th 9th 12th 15th 20th 21st 40th 100th 1,000th",
     "first second third fifth eighth ninth twelfth fifteenth twentieth twenty first fortieth one hundredth "
     "one thousandth"),
    ("3.14 0.5 4.05", "three point one four zero point five four point zero five"),
    ("7:15 7:05 8:00 12:30", "seven fifteen seven oh five eight o'clock twelve thirty"),
    ("$1 $3.50 $0.99 $1,200",
     "one dollar three dollars and fifty cents ninety nine cents one thousand two hundred dollars"),
    ("1905 1900 1100 1999 2026", "nineteen oh five nineteen hundred eleven hundred nineteen ninety nine "
                                 "two thousand twenty six"),
    ("1,500 people", "one thousand five hundred people"),
    ("3 and a half", "three point five"),
])
def test_digits_and_words_normalise_alike(digits, words):
    assert bench.normalise(digits) == bench.normalise(words)


@pytest.mark.parametrize(("text", "expected"), [
    ("4.5", "four point five"),  # was "four five": the point became a space
    ("15th", "fifteenth"),  # was "fifteen th"
    ("23rd", "twenty third"),
    ("1890", "eighteen ninety"),  # was "one thousand eight hundred ninety"
    ("at 715", "at seven fifteen"),  # was "at seven hundred fifteen"
    ("$20", "twenty dollars"),  # was "twenty"
    ("one hundred and twelve", "one hundred twelve"),
    # left alone: "and" that is not inside a number, "at" + a number that is no clock time, long numbers
    ("one egg and a pinch of salt", "one egg and a pinch of salt"),
    ("three hours and forty minutes", "three hours and forty minutes"),
    ("at 100 at 1500 at 715,000", "at one hundred at fifteen hundred at seven hundred fifteen thousand"),
    ("1234567", "1234567"),
    ("Don't stop—it's 'fine'.", "don't stop it's fine"),
])
def test_normalise(text, expected):
    assert bench.normalise(text) == expected


@pytest.mark.parametrize(("n", "ordinal"), [(0, "zeroth"), (1, "first"), (11, "eleventh"), (13, "thirteenth"),
                                            (30, "thirtieth"), (99, "ninety ninth"), (101, "one hundred first"),
                                            (2000, "two thousandth")])
def test_spell_ordinal(n, ordinal):
    assert bench.spell_ordinal(n) == ordinal


def test_wer_of_a_transcript_in_digits_against_its_words_is_zero():
    jiwer = pytest.importorskip("jiwer")
    transcripts = ["The train from London to Edinburgh takes about 4.5 hours.",
                   "Emma was born on the 23rd of August, 2001.", "My train leaves at 7:15 tomorrow morning."]
    in_words = ["The train from London to Edinburgh takes about four and a half hours.",
                "Emma was born on the twenty-third of August, two thousand and one.",
                "My train leaves at seven fifteen tomorrow morning."]
    assert jiwer.wer([bench.normalise(t) for t in in_words], [bench.normalise(t) for t in transcripts]) == 0.0


def test_every_reference_sentence_is_already_in_words():
    """The rules above read digits; the references must give them nothing else to read."""
    from dreidel.data.speech import test_sentences

    for sentence in test_sentences():
        assert not any(c.isdigit() for c in sentence), sentence
        assert bench.normalise(bench.normalise(sentence)) == bench.normalise(sentence)
