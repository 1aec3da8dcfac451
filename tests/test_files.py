"""dreidel._files: temporary names for atomic writes get the modes open() and mkdir() would give."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from dreidel._files import replaced_atomically, staging_dir, staging_file


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_staging_names_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        handle, name = staging_file(tmp_path / "out.csv")
        os.close(handle)
        directory = staging_dir(tmp_path / "model")
    finally:
        os.umask(old)
    assert os.stat(name).st_mode & 0o777 == 0o666 & ~umask
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
    assert os.path.dirname(name) == str(tmp_path) and directory.parent == tmp_path
    assert os.umask(old) == old  # left as it was


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux shows the umask in /proc")
def test_the_umask_is_read_without_setting_it(tmp_path, monkeypatch):
    """Setting the umask to read it would give another thread's new files the wrong mode meanwhile."""
    monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
    handle, name = staging_file(tmp_path / "out.csv")
    os.close(handle)
    assert os.path.exists(name)


@pytest.mark.parametrize("name", ["run-" + "x" * 251, "é" * 127])  # 255 bytes each, the most a name may have
def test_staging_names_fit_beside_a_target_with_the_longest_name(tmp_path, name):
    handle, staged = staging_file(tmp_path / name, suffix=".png")
    os.close(handle)
    directory = staging_dir(tmp_path / name)
    for staging in (os.path.basename(staged), directory.name):
        assert staging.startswith(".") and len(os.fsencode(staging)) <= 255
    assert staged.endswith(".png")
    assert os.path.basename(staging_file(tmp_path / name)[1]) != os.path.basename(staged)  # still unique


needs_pread = pytest.mark.skipif(not hasattr(os, "pread"), reason="reads the synced file with os.pread (POSIX)")


def _record_fsyncs(monkeypatch, target) -> list[tuple[bytes, bool]]:
    """Patch os.fsync to record, at each call, the synced file's content and whether ``target`` exists yet."""
    synced, real_fsync = [], os.fsync

    def recording_fsync(handle):
        synced.append((os.pread(handle, 1 << 20, 0), os.path.exists(target)))
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return synced


@needs_pread
@pytest.mark.parametrize("by_name", [False, True], ids=["through-fd", "by-name"])
def test_the_staged_file_is_synced_whole_before_the_rename(tmp_path, monkeypatch, by_name):
    """write_ctranslate2, shipped files and synthesize_to_file renamed their staged file unsynced: a crash soon
    after could leave an empty or partial target."""
    target = tmp_path / "out.bin"
    synced = _record_fsyncs(monkeypatch, target)
    with replaced_atomically(target) as (handle, name):
        if by_name:  # as soundfile and matplotlib write: they get the name
            os.close(handle)
            Path(name).write_bytes(b"whole content")
        else:
            with os.fdopen(handle, "wb") as out:
                out.write(b"whole content")
    assert synced == [(b"whole content", False)]
    assert target.read_bytes() == b"whole content"


@needs_pread
def test_writers_sync_once(tmp_path, monkeypatch):
    from dreidel.io import shipped, write_ctranslate2, write_text_file

    synced = _record_fsyncs(monkeypatch, tmp_path / "none")
    write_text_file(tmp_path / "a.srt", "text")
    write_ctranslate2(tmp_path / "model.bin", "S", 1, {"w": torch.ones(3)})
    shipped._atomic_copy([tmp_path / "a.srt"], tmp_path / "copy.srt")
    assert [content for content, _ in synced] == [b"text", (tmp_path / "model.bin").read_bytes(), b"text"]


def test_a_missing_folder_is_named_not_the_staging_file(tmp_path):
    """It was FileNotFoundError naming the hidden '.out.srt.xxxx.tmp'."""
    from dreidel.io import write_ctranslate2, write_text_file

    target = tmp_path / "no_such_folder" / "out.srt"
    message = f"folder {str(target.parent)!r} does not exist, so {str(target)!r} cannot be written"
    with pytest.raises(ValueError, match=re.escape(message)):
        write_text_file(target, "text")
    with pytest.raises(ValueError, match=re.escape(message.replace("out.srt", "model.bin"))):
        write_ctranslate2(target.parent / "model.bin", "S", 1, {"w": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


def _write(path: Path, text: str) -> None:
    from dreidel.io import write_text_file

    write_text_file(path, text)


def test_a_rewritten_file_keeps_its_mode_and_a_link_is_written_through(tmp_path):
    """The atomic rename put a new file with open()'s mode in place: a 0600 file became 0644, and a symbolic link
    became a regular file while the file it named stayed old (a user audit)."""
    private = tmp_path / "private.srt"
    private.write_text("old")
    private.chmod(0o600)
    _write(private, "new")
    assert private.read_text() == "new" and private.stat().st_mode & 0o777 == 0o600
    real, link = tmp_path / "real.srt", tmp_path / "link.srt"
    real.write_text("old")
    link.symlink_to(real)
    _write(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    dangling = tmp_path / "dangling.srt"
    dangling.symlink_to(tmp_path / "made.srt")  # as open(link, "w") does, the file it names is made
    _write(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "made.srt").read_text() == "made"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.srt", "link.srt", "made.srt", "private.srt",
                                                           "real.srt"]


def test_a_fifo_is_refused_not_replaced(tmp_path):
    fifo = tmp_path / "pipe.srt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        _write(fifo, "x")
    assert fifo.is_fifo() and [p.name for p in tmp_path.iterdir()] == ["pipe.srt"]


def test_a_replaced_checkpoint_keeps_its_folder_mode_and_a_link_to_one_is_written_through(tmp_path):
    from dreidel.io.checkpoint import read_checkpoint, write_checkpoint

    tensors = {"w": torch.ones(2)}
    folder = write_checkpoint(tmp_path / "m", {"format": "dreidel.test"}, tensors)
    folder.chmod(0o700)
    write_checkpoint(folder, {"format": "dreidel.test", "v": 2}, tensors)
    assert folder.stat().st_mode & 0o777 == 0o700
    (tmp_path / "latest").symlink_to(folder)
    write_checkpoint(tmp_path / "latest", {"format": "dreidel.test", "v": 3}, tensors)
    assert (tmp_path / "latest").is_symlink() and read_checkpoint(folder)[0]["v"] == 3
