"""`dreidel transcribe FILE...`: speech to text with Whisper, printing each text (and, if asked, its timed
segments) and its real-time factor."""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from pathlib import Path

from dreidel._extras import require_extras
from dreidel._files import check_file_target
from dreidel.cli._args import MAX_BEAM, MAX_THREADS, file_problem, int_in_range, probability_or_none, real_or_none
from dreidel.cli._streams import discard_stdout
from dreidel.cli._table import counted


OUTPUT_FORMATS = ("txt", "srt", "vtt")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transcribe", help="transcribe audio files with Whisper (tiny.en by default)",
        epilog="Audio is decoded in 30 s windows. Less than 0.5 s left after a window's text at the end of a file "
               "is not decoded (padded to 30 s alone, such slivers came out as words that were not spoken), so "
               "a word shorter than that, spoken last after a pause, is lost.")
    # nargs="*", checked in run: argparse would report a missing FILE before an unknown option (main names those).
    parser.add_argument("files", nargs="*", metavar="FILE",
                        help="audio files (any format libsndfile reads; a name starting with '-' after '--')")
    parser.add_argument("--model", default="tiny.en",
                        help="tiny.en, base, or a CTranslate2 / Hugging Face Whisper directory (default: tiny.en)")
    parser.add_argument("--beam", type=int, default=1,
                        help=f"beam size, 1 to {MAX_BEAM}; 1 is greedy (default: 1)")
    parser.add_argument("--threads", type=int_in_range(1, MAX_THREADS), default=None,
                        help=f"torch CPU threads, 1 to {MAX_THREADS} (default: torch's choice)")
    parser.add_argument("--language", default="en", help="language code for multilingual models (default: en)")
    parser.add_argument("--int8", action="store_true", help="int8 dynamic quantisation of the linear layers")
    # Left out unless given, so that transcribe's own default applies (its module is imported only to run).
    parser.add_argument("--no-speech-threshold", type=probability_or_none, default=argparse.SUPPRESS, metavar="P",
                        help="a window whose no-speech probability exceeds P and whose text is unsure (average "
                             "log-probability at most -1) gives no text, as in openai-whisper; 'none' keeps every "
                             "window's text (default: transcribe's, 0.6)")
    parser.add_argument("--silence-threshold-dbfs", type=real_or_none("a level in dB", -200, 0),
                        default=argparse.SUPPRESS, metavar="DB",
                        help="a 30 s window whose every sample is below DB (dB relative to full scale) is silence "
                             "and gives no text, undecoded (tiny.en writes silence as 'you'); 'none' decodes "
                             "every window (default: transcribe's, -80)")
    parser.add_argument("--no-fallback", dest="fallback", action="store_false",
                        help="plain greedy decoding: do not decode again, by a beam search of 5, the windows whose "
                             "text is unsure (average log-probability below -1) or loops (gzip ratio above 2.4)")
    parser.add_argument("--no-timestamps", dest="timestamps", action="store_false",
                        help="decode text only, long audio in consecutive 30 s windows (faster; speech across a "
                             "cut can lose words), instead of timed segments, each window resuming the previous "
                             "one's unfinished segment")
    parser.add_argument("--initial-prompt", default=None, metavar="TEXT",
                        help="text the first window with sound follows, as if spoken before it, to steer "
                             "spellings, names and style (default: none)")
    parser.add_argument("--condition-on-previous-text", action="store_true",
                        help="give each window the text decoded before it (after the initial prompt), as "
                             "openai-whisper does by default; a misheard phrase can carry on, and on tiny.en it "
                             "did not lower the WER (BENCHMARKS.md; default: off)")
    parser.add_argument("--segments", action="store_true",
                        help="also print each segment with its start and end in seconds")
    parser.add_argument("--output-format", choices=(*OUTPUT_FORMATS, "all"), default=None,
                        help="also write each transcript to OUTPUT_DIR/<file name>.<format>: txt (the text), srt or "
                             "vtt (subtitles of the segments), or all three (default: none)")
    parser.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where --output-format writes, created if missing (default: the current directory)")
    parser.set_defaults(func=run, parser=parser)


def output_paths(args: argparse.Namespace) -> list[dict[str, Path]]:
    """For each input file, the file each asked-for format is written to; two inputs that would write the same
    file (same name, other directories), or a target that is one of the inputs (a WAV named clip.txt, its txt
    written next to it, was replaced by its transcript), are usage errors, raised before anything is decoded."""
    chosen, given_directory = getattr(args, "output_format", None), getattr(args, "output_dir", None)
    if chosen is None and given_directory is not None:
        args.parser.error("argument --output-dir: writes nothing without --output-format txt|srt|vtt|all")
    formats = () if chosen is None else OUTPUT_FORMATS if chosen == "all" else (chosen,)
    directory = Path("." if given_directory is None else given_directory)
    if formats and directory.exists() and not directory.is_dir():
        args.parser.error(f"argument --output-dir: {directory} is a file, not a directory")
    paths = [{kind: directory / f"{Path(file).stem}.{kind}" for kind in formats} for file in args.files]
    writers: dict[Path, str] = {}
    inputs = {_file_in_folder(file): file for file in args.files}  # the files exist (checked before)
    for file, targets in zip(args.files, paths):
        for target in targets.values():
            if target in writers:
                args.parser.error(f"argument FILE: {writers[target]} and {file} would both be written to {target}")
            writers[target] = file
            try:  # a directory where the file goes, a file where a folder goes, or a folder that may not be
                replaced = inputs.get(_file_in_folder(target))
                if replaced is not None:
                    args.parser.error(f"argument --output-dir: the {target.suffix[1:]} transcript of {file} would "
                                      f"replace the input {replaced}; choose another --output-dir")
                check_file_target(target)  # written in: before anything is decoded
            except ValueError as error:
                args.parser.error(f"argument --output-dir: {error}")
            except PermissionError as error:  # ours name the path in the message, the OS's apart from it
                where = f": {error.filename}" if error.filename else ""
                args.parser.error(f"argument --output-dir: {error.strerror}{where}")
    return paths


def _file_in_folder(path: str | Path) -> tuple[int, int, int, int] | None:
    """The file a write to ``path`` replaces, symbolic links followed (as the atomic writes follow them), and the
    folder it lies in: both as (device, inode); None where there is no such file. Comparing files, not names,
    also finds clip.TXT in clip.txt on a case-insensitive file system (macOS, vfat); comparing folders leaves
    a hard link elsewhere to the same file be, as the write (a new file renamed into place) does."""
    real = os.path.realpath(path)
    try:
        file, folder = os.stat(real), os.stat(os.path.dirname(real))
    except PermissionError:  # output_paths reports it
        raise
    except OSError:  # no such file or folder, or a loop of links (ELOOP): check_file_target names it
        return None
    return file.st_dev, file.st_ino, folder.st_dev, folder.st_ino


def write_outputs(result, targets: dict[str, Path]) -> None:
    """Each of ``targets`` (format -> path) written atomically from ``result`` (a Transcription); prints nothing."""
    from dreidel.io.subtitles import format_srt, format_vtt, write_text_file

    render = {"txt": lambda r: r.text + "\n", "srt": lambda r: format_srt(r.segments),
              "vtt": lambda r: format_vtt(r.segments)}
    for kind, path in targets.items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_file(path, render[kind](result))
        except (OSError, ValueError) as error:  # a read-only or full disk, or a folder made since the check: the
            # user's setup, one line, no traceback
            reason = error.strerror or error if isinstance(error, OSError) else error
            raise SystemExit(f"dreidel transcribe: error: cannot write {path}: {reason}") from None


# Files transcribed together, then written (and printed) before the next group is decoded: a Ctrl-C or a crash
# keeps what earlier groups wrote. transcribe's default batch size: 8 inputs fill a batch of 8 windows (with
# timestamps it decodes each input's windows in order, one input per batch slot), and 8 short clips one.
FILES_PER_GROUP = 8


class _Report:
    """The lines printed to stdout. Where the reader leaves early (``| head -1``) while files are still to be
    written (``--output-format``), the rest goes to the null device and the work goes on: every asked-for file
    is written, and the command then exits as a broken pipe would (141). Without such files it stops there."""

    def __init__(self, files_to_write: bool) -> None:
        self.files_to_write = files_to_write
        self.reader_left = False

    def line(self, text: str) -> None:
        try:
            print(text)
        except BrokenPipeError:
            if not self.files_to_write:
                raise
            self.reader_left = True
            discard_stdout()


class _OncePerMessage(logging.Filter):
    """Lets each message at ``level`` or above through once (lower levels always)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _print_result(report: _Report, path: str, result, targets: dict[str, Path], segments: bool) -> None:
    """One file's lines: its text, its segments if asked, its times and the files written. Audio shorter than
    one 10 ms mel frame (an empty file included) is not decoded: no real-time factor."""
    report.line(f"{path}: {result.text}")
    if segments:
        for segment in result.segments:
            report.line(f"  [{segment.start:7.2f} -> {segment.end:7.2f}] {segment.text}")
    rtf = f"{result.rtf:.3f}" if result.tokens else "-"
    report.line(f"  {result.seconds_audio:.2f} s audio, {result.seconds_compute:.2f} s compute, RTF {rtf}")
    for written in targets.values():
        report.line(f"  wrote {written}")


def run(args: argparse.Namespace) -> int:
    # Checked here rather than by argparse types so that `func` alone (as the tests call it) rejects them too.
    if not args.files:
        args.parser.error("the following arguments are required: FILE")
    if not args.language.strip():
        args.parser.error("argument --language: expected a language code such as en, got an empty one")
    if not 1 <= args.beam <= MAX_BEAM:
        args.parser.error(f"argument --beam: expected an int in [1, {MAX_BEAM}], got {args.beam}")
    for problem in filter(None, map(file_problem, args.files)):
        args.parser.error(f"argument FILE: {problem}")
    initial_prompt = getattr(args, "initial_prompt", None)
    if initial_prompt is not None and not initial_prompt.strip():
        args.parser.error("argument --initial-prompt: expected some text, got a blank one (leave it out for no prompt)")
    if not args.model.strip():
        args.parser.error("argument --model: expected tiny.en, base or a model directory, got an empty name")
    outputs = output_paths(args)

    import torch

    from dreidel.audio import load_audio
    from dreidel.audio._load import ARRAY_PEAK_WARNING
    from dreidel.models import whisper

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from dreidel._native import best_isa

    logging.getLogger("dreidel.cli").info("torch %s, %s, native core dispatched to %s", torch.__version__,
                                          counted(torch.get_num_threads(), "thread"), best_isa())
    # A bad model directory, language, threshold or audio file, or a missing extra, is the user's input, not a
    # bug: one line, no traceback.
    try:
        # What any Whisper weights need; the shipped tiny.en's package is checked where it is looked up.
        require_extras("dreidel transcribe", "whisper", modules=("tokenizers", "soundfile"))
        waveforms = [load_audio(path) for path in args.files]  # a bad file fails before the model loads
        recognizer = whisper.load(args.model)
        if args.int8:
            recognizer = whisper.quantize_int8(recognizer)
    except (ValueError, TypeError, ModuleNotFoundError) as error:
        raise SystemExit(f"dreidel transcribe: error: {error}") from None
    options = {name: getattr(args, name) for name in ("no_speech_threshold", "silence_threshold_dbfs")
               if hasattr(args, name)}
    options.update(beam_size=args.beam, language=args.language, fallback=getattr(args, "fallback", True),
                   timestamps=getattr(args, "timestamps", True), initial_prompt=initial_prompt,
                   condition_on_previous_text=getattr(args, "condition_on_previous_text", False))
    report = _Report(files_to_write=any(outputs))
    total_audio = total_compute = 0.0
    decoded = 0
    # A warning about the options (a long initial prompt) is logged by each group's call: shown once.
    once = _OncePerMessage(logging.WARNING)
    whisper_log = logging.getLogger("dreidel.models.whisper")
    whisper_log.addFilter(once)
    try:
        for first in range(0, len(args.files), FILES_PER_GROUP):
            group = slice(first, first + FILES_PER_GROUP)
            try:
                with warnings.catch_warnings():  # the files' levels were checked as they were read, naming them
                    warnings.filterwarnings("ignore", message=ARRAY_PEAK_WARNING, category=UserWarning)
                    results = whisper.transcribe(recognizer, waveforms[group], **options)
            except (ValueError, TypeError) as error:
                raise SystemExit(f"dreidel transcribe: error: {error}") from None
            for path, result, targets in zip(args.files[group], results, outputs[group]):
                write_outputs(result, targets)  # then its lines: a write that fails leaves those before it printed
                _print_result(report, path, result, targets, getattr(args, "segments", False))
                if result.tokens:
                    decoded += 1
                    total_audio += result.seconds_audio
                    total_compute += result.seconds_compute
    finally:
        whisper_log.removeFilter(once)
    if decoded > 1:
        report.line(f"total: {total_audio:.2f} s audio, {total_compute:.2f} s compute, "
                    f"RTF {total_compute / total_audio:.3f} ({counted(torch.get_num_threads(), 'thread')}, "
                    f"beam {args.beam})")
    if report.reader_left:
        raise BrokenPipeError  # main's exit for a reader that left: 141, and nothing more printed
    return 0
