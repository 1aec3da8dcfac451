"""Audio input: files through libsndfile (``soundfile``), arrays and tensors; mono float32 at 16 kHz."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import torch

from dreidel.audio._mel import MAX_CHANNELS, SAMPLE_RATE, warn_beyond_full_scale
from dreidel.audio._resample import resample

__all__ = ["load_audio", "pcm_to_float"]

# How the warning about an array's (or tensor's) samples beyond full scale starts (a file's names the file
# instead).
ARRAY_PEAK_WARNING = "audio: float samples"


def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Integer PCM to float32 in [-1, 1): int8 / 2**7, int16 / 2**15, int32 / 2**31, uint8 centred at 128; floats
    cast (with a warning if they pass 1.5 in magnitude: int16 values as floats, say, which read as noise).

    Raises:
        TypeError: int64 (no PCM format; what ``torch.tensor`` makes of Python ints, whose 2**63 scale left int16
            values at 1e-15) or another non-audio dtype.
    """
    samples = np.asarray(samples)
    samples = samples.astype(samples.dtype.newbyteorder("="), copy=False)  # big-endian int16 is int16 too
    if samples.dtype == np.uint8:
        return (samples.astype(np.float32) - 128.0) / 128.0
    if samples.dtype in (np.int8, np.int16, np.int32):
        return (samples.astype(np.float64) / float(2 ** (8 * samples.dtype.itemsize - 1))).astype(np.float32)
    if np.issubdtype(samples.dtype, np.floating):
        samples = samples.astype(np.float32, copy=False)
        warn_beyond_full_scale(samples, ARRAY_PEAK_WARNING, "integer PCM values given as floats? (int16: divide "
                               "by 32768)")
        return samples
    if samples.dtype == np.int64:
        raise TypeError("audio samples: int64 is no PCM format (int16, int32, uint8 are; torch.tensor of Python "
                        "ints makes int64): give x.astype(np.int16) / x.to(torch.int16), or floats in [-1, 1]")
    raise TypeError(f"audio samples must be integer PCM (int8, int16, int32, uint8) or floating point, got dtype "
                    f"{samples.dtype}")


# Data-chunk sizes that writers unable to seek back (a pipe, a stream) leave in the header: 0, 0x7FFFFFFF,
# 0x80000000 (arecord) or 0xFFFFFFFF. Not a truncation: the audio is whatever the file holds.
_STREAMING_WAV_SIZES = (0, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _wav_data_chunk(path: Path) -> tuple[int, int, int] | None:
    """``(offset, declared, held)`` of a RIFF/WAVE file's data chunk: where its header starts, the size it
    declares, and the bytes the file holds after that header; ``None`` for another format.

    Raises:
        ValueError: the file ends inside a chunk header, or inside a chunk before its data chunk.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:] != b"WAVE":
            return None
        return next((offset, chunk_size, size - offset - 8)  # _chunks raises where the file ends first
                    for offset, chunk_id, chunk_size in _chunks(handle, size, 12, "<4sI", path, "WAV", "data")
                    if chunk_id == b"data")


def _chunks(handle, size: int, offset: int, layout: str, path: Path, kind: str, awaited: str):
    """``(offset, id, size)`` of each chunk of a file of ``size`` bytes from ``offset`` on, its header of
    ``struct`` ``layout``: RIFF's and AIFF's (a 4-byte id and size, chunks padded to an even size) or Wave64's
    (a 16-byte GUID and an 8-byte size that counts the 24-byte header, chunks aligned to 8 bytes). The caller
    stops at the chunk it awaits; a ``ValueError`` naming ``path`` (a truncated ``kind`` file) where the file
    ends first, or inside a chunk header."""
    wave64 = layout == "<16sQ"
    while offset < size:
        chunk_id, chunk_size = _chunk_header(handle, offset, size, layout, path, kind)
        yield offset, chunk_id, chunk_size
        offset += max(24, chunk_size + (-chunk_size) % 8) if wave64 else 8 + chunk_size + chunk_size % 2
    raise ValueError(f"{path}: truncated {kind} file: it ends before its {awaited} chunk")


def _chunk_header(handle, offset: int, size: int, layout: str, path: Path, kind: str) -> tuple:
    """The header (``struct`` ``layout``) of the chunk at ``offset`` of a file of ``size`` bytes; a
    ``ValueError`` naming ``path`` where the file ends inside it."""
    length = struct.calcsize(layout)
    if offset + length > size:
        raise ValueError(f"{path}: truncated {kind} file: it ends inside a chunk header, before its audio")
    handle.seek(offset)
    return struct.unpack(layout, handle.read(length))


# Wave64 (Sony): RIFF's layout with 16-byte GUIDs for chunk ids and 64-bit sizes that count the 24-byte header.
_W64_RIFF = b"riff\x2e\x91\xcf\x11\xa5\xd6\x28\xdb\x04\xc1\x00\x00"
_W64_DATA = b"data\xf3\xac\xd3\x11\x8c\xd1\x00\xc0\x4f\x8e\xdb\x8a"


def _other_declared_audio(path: Path) -> tuple[str, int, int] | None:
    """``(format, declared, held)`` for the data of an RF64/BW64 (EBU Tech 3306), Wave64 or AIFF/AIFC file
    (Apple, 1989): the bytes of audio its header declares and those the file holds; ``None`` for another format.

    Raises:
        ValueError: the file ends inside a chunk header, or before its audio chunk.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = handle.read(16)
        if start[:4] in (b"RF64", b"BW64") and start[8:12] == b"WAVE":
            declared = None
            for offset, chunk_id, chunk_size in _chunks(handle, size, 12, "<4sI", path, "RF64", "audio"):
                if chunk_id == b"ds64":  # 64-bit sizes: the file's, then the data chunk's
                    declared = _chunk_header(handle, offset + 8, size, "<QQ", path, "RF64")[1]
                elif chunk_id == b"data":  # its 32-bit size is 0xFFFFFFFF where ds64 holds the real one
                    if chunk_size != 0xFFFFFFFF or declared is None:
                        declared = chunk_size
                    return "RF64", declared, size - offset - 8
        elif start == _W64_RIFF:
            for offset, guid, chunk_size in _chunks(handle, size, 40, "<16sQ", path, "Wave64", "audio"):
                if guid == _W64_DATA:
                    return "Wave64", chunk_size - 24, size - offset - 24
        elif start[:4] == b"FORM" and start[8:12] in (b"AIFF", b"AIFC"):
            return _aiff_declared_audio(handle, size, path, compressed=start[8:12] == b"AIFC")
    return None


# AIFC compression types whose samples take ceil(sampleSize / 8) bytes each: PCM and floats. In the others (ulaw,
# ima4, ...) a sample's bytes do not follow from COMM's sampleSize.
_AIFC_SIZED_SAMPLES = (b"NONE", b"twos", b"sowt", b"raw ", b"fl32", b"FL32", b"fl64", b"FL64")


def _aiff_declared_audio(handle, size: int, path: Path, compressed: bool) -> tuple[str, int, int]:
    """``("AIFF", declared, held)`` for an AIFF or AIFC file (``compressed``) of ``size`` bytes: the bytes of
    audio its SSND chunk declares and those the file holds from where the audio starts.

    Raises:
        ValueError: the file ends inside a chunk header or before its SSND chunk; the SSND chunk's audio
            offset points past the chunk's end (the audio loaded as empty); or a COMM chunk before it declares
            more sample frames than the SSND chunk holds (libsndfile read the shorter audio without a word).
    """
    frames, frame_size = 0, 0  # what COMM declares, where a frame's size follows from it (not checked after SSND)
    for offset, chunk_id, chunk_size in _chunks(handle, size, 12, ">4sI", path, "AIFF", "audio"):
        if chunk_id == b"COMM":  # channels, sample frames, bits per sample, rate; AIFC: then a compression type
            channels, count, sample_bits = _chunk_header(handle, offset + 8, size, ">hIh", path, "AIFF")
            kind = b"NONE" if not compressed else (
                _chunk_header(handle, offset + 26, size, ">4s", path, "AIFF")[0] if chunk_size >= 22 else None)
            if kind in _AIFC_SIZED_SAMPLES and channels > 0 and sample_bits > 0:
                frames, frame_size = count, channels * -(-sample_bits // 8)
        elif chunk_id == b"SSND":  # then a 4-byte offset to the audio and a 4-byte block size
            skip = _chunk_header(handle, offset + 8, size, ">I", path, "AIFF")[0]
            if skip > chunk_size - 8:
                raise ValueError(f"{path}: corrupt AIFF file: its SSND chunk's audio offset ({skip} bytes) points "
                                 f"past the end of its {max(0, chunk_size - 8)} bytes of sample data")
            declared = chunk_size - 8 - skip
            if frames * frame_size > declared:
                raise ValueError(f"{path}: truncated AIFF file: its COMM chunk declares {frames} sample frames "
                                 f"({frames * frame_size} bytes of audio), its SSND chunk holds {declared}")
            return "AIFF", declared, max(0, size - offset - 16 - skip)


def _looks_like_chunks(data: bytes, offset: int) -> bool:
    """Whether a RIFF chunk header (four printable ASCII characters, a size that fits) starts at ``offset``."""
    if offset + 8 > len(data):
        return False
    chunk_id, chunk_size = struct.unpack_from("<4sI", data, offset)
    return all(0x20 <= byte <= 0x7E for byte in chunk_id) and offset + 8 + chunk_size <= len(data)


def _readable_source(path: Path):
    """What libsndfile is to read for ``path``: its name as bytes (a Linux file name need not be UTF-8, which
    soundfile would encode it as), or, for a WAV file whose data size is a streaming placeholder
    (``_STREAMING_WAV_SIZES``), an in-memory copy with its sizes filled in: libsndfile read no audio at all
    where the placeholder was 0.

    Raises:
        ValueError: a WAV, RF64, Wave64 or AIFF file whose header declares more bytes of audio than the file
            holds, or that ends inside a chunk header: libsndfile reads such a file (a download or copy cut
            short) up to its end without a word, as if the audio were short. An AIFF file whose audio offset
            points past its SSND chunk, or whose COMM chunk declares more sample frames than that chunk holds.
    """
    chunk = _wav_data_chunk(path)
    if chunk is None:
        other = _other_declared_audio(path)
        if other is not None and other[1] > other[2]:
            raise ValueError(f"{path}: truncated {other[0]} file: its header declares {other[1]} bytes of audio, "
                             f"the file holds {other[2]}")
        return os.fsencode(path)
    if chunk[1] == chunk[2]:
        return os.fsencode(path)
    offset, declared, held = chunk
    if declared not in _STREAMING_WAV_SIZES:
        if declared > held:
            raise ValueError(f"{path}: truncated WAV file: its data chunk declares {declared} bytes of audio, the "
                             f"file holds {held}")
        return os.fsencode(path)  # more chunks after the audio
    if held == 0:
        return os.fsencode(path)  # no audio: an empty data chunk
    data = bytearray(path.read_bytes())
    if declared == 0 and _looks_like_chunks(data, offset + 8):
        return os.fsencode(path)  # an empty data chunk with chunks after it
    struct.pack_into("<I", data, 4, min(len(data) - 8, 0xFFFFFFFF))
    struct.pack_into("<I", data, offset + 4, min(held, 0xFFFFFFFF))
    return io.BytesIO(data)


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected an audio file")
    if not path.exists():
        raise ValueError(f"audio file not found: {path}")
    if not path.is_file():  # a FIFO would block the read, a link to /dev/zero fill memory
        raise ValueError(f"{path} is not a regular file (a FIFO, a device, a socket); expected an audio file")
    source = _readable_source(path)
    try:
        with soundfile.SoundFile(source) as audio:
            samples = audio.read(dtype="float32", always_2d=True)  # (frames, channels)
            declared, rate, container = audio.frames, audio.samplerate, audio.format
    except RuntimeError as error:  # soundfile.LibsndfileError derives from it
        raise ValueError(f"{path}: not a readable audio file (expected WAV, FLAC, OGG/Vorbis, MP3 or another "
                         f"format libsndfile reads): {error}") from None
    # An MP3 whose Xing/LAME header states its length but that was cut short decodes what is left without an
    # error (libmpg123 only prints a warning). Without such a header the length is estimated from the file's
    # size, and what is decoded matches it.
    if container in ("MP3", "MPEG") and samples.shape[0] < declared:
        raise ValueError(f"{path}: truncated MP3 file: its header declares {declared} frames of audio, the file "
                         f"holds {samples.shape[0]}")
    return samples.T, int(rate)  # (channels, frames)


# The fastest rate of studio audio (DXD and 768 kHz PCM are the highest in use). A file's header can claim
# any rate up to 2^32 - 1, and the anti-aliasing filter for a rate far above 16 kHz is as long as the ratio.
MAX_SAMPLE_RATE = 768_000
# Half the slowest rate speech is stored at (8 kHz telephony). Below it the 16 kHz output would be many
# times the input: an 8 KB file whose header claims 1 Hz became 64 million samples (1.1 hours of audio).
MIN_SAMPLE_RATE = 4_000


def load_audio(path_or_array, sample_rate: int | None = None) -> torch.Tensor:
    """Load audio as mono float32 at 16 kHz.

    Args:
        path_or_array: an audio file path (any format libsndfile reads; the file's rate is used), or samples as
            a numpy array / torch tensor of shape ``(samples,)`` or ``(channels, samples)``; integer PCM (of
            either byte order) is scaled to [-1, 1), and floats beyond 1.5 warn (see ``pcm_to_float``). A
            ``(samples, channels)`` array (as ``soundfile.read`` gives) must be transposed first: one of more
            than 16 rows is refused as such, but a short one (16 samples of 2 channels) is taken as 16
            channels of 2 samples.
        sample_rate: rate of the given array in Hz (``None``: already 16 kHz). Must be ``None`` for a file.

    Returns:
        float32 tensor ``(samples,)`` at 16 kHz: channels averaged, resampled with a band-limited
        windowed-sinc filter. Empty input gives an empty tensor (zero samples), not an error; Whisper pads
        it to a silent 30 s window.

    Raises:
        ValueError: missing, unreadable, truncated (WAV, RF64, Wave64, AIFF, an MP3 whose header states its length) or corrupt (AIFF) file, a directory
            or another file that is not a regular one (naming the path), bad shape or no channels, non-finite
            samples, a rate that is not an integer from ``MIN_SAMPLE_RATE`` (4 kHz) to ``MAX_SAMPLE_RATE``
            (768 kHz), or one above about 660 kHz sharing so few factors with 16 kHz that its filter table
            would take hundreds of MB (see ``resample``; every rate audio is recorded at, 768 kHz included,
            shares many).
    """
    where = f"{path_or_array}: " if isinstance(path_or_array, (str, os.PathLike)) else ""  # names a file in errors
    if isinstance(path_or_array, (str, os.PathLike)):
        if sample_rate is not None:
            raise ValueError(f"sample_rate must be None for a file (its rate is read from {path_or_array})")
        samples, rate = _read_file(Path(path_or_array))
        # libsndfile scales integer PCM into [-1, 1): only a float file's samples can pass it
        warn_beyond_full_scale(samples, f"{path_or_array}: samples", "a float file of unscaled values?")
        waveform = torch.from_numpy(np.ascontiguousarray(samples))
    elif isinstance(path_or_array, (np.ndarray, torch.Tensor)):
        rate = SAMPLE_RATE if sample_rate is None else sample_rate
        samples = path_or_array
        if isinstance(samples, torch.Tensor):  # as numpy, to get the same scaling and peak warning
            tensor = samples.detach().cpu()
            samples = tensor.to(torch.float32).numpy() if tensor.is_floating_point() else tensor.numpy()
        if samples.ndim == 0:  # before ascontiguousarray, which makes it one sample
            raise ValueError("audio array must be (samples,) or (channels, samples), got a 0-d array (a scalar)")
        waveform = torch.from_numpy(np.ascontiguousarray(pcm_to_float(samples)))
        if waveform.dim() not in (1, 2):
            raise ValueError(f"audio array must be (samples,) or (channels, samples), got shape {tuple(waveform.shape)}")
        if waveform.dim() == 2 and waveform.shape[0] == 0:
            raise ValueError(f"audio array has no channels: shape {tuple(waveform.shape)}, expected (channels, "
                             f"samples) with at least one channel")
        if waveform.dim() == 2 and waveform.shape[0] > MAX_CHANNELS:
            raise ValueError(f"audio array must be (channels, samples) with at most {MAX_CHANNELS} channels, got "
                             f"shape {tuple(waveform.shape)}; transpose a (samples, channels) array")
    else:
        raise TypeError(f"path_or_array must be a path, numpy array or torch tensor, got {type(path_or_array).__name__}")
    integer = isinstance(rate, (int, np.integer)) and not isinstance(rate, bool)
    if not integer or not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{where}sample rate must be an integer number of Hz from {MIN_SAMPLE_RATE} (half the "
                         f"telephone rate) to {MAX_SAMPLE_RATE} (the highest rate audio is recorded at), got {rate!r}")
    if waveform.dim() == 2:
        waveform = waveform.mean(dim=0)
    if not torch.isfinite(waveform).all():
        raise ValueError(f"{where}audio contains NaN or infinite samples")
    try:
        return resample(waveform.to(torch.float32), int(rate), SAMPLE_RATE).contiguous()
    except ValueError as error:  # a rate sharing too few factors with 16 kHz (see resample)
        raise ValueError(f"{where}{error}") from None
