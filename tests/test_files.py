"""dreidel._files: temporary names for atomic writes get the modes open() and mkdir() would give."""

from __future__ import annotations

import os

import pytest

from dreidel._files import staging_dir, staging_file


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
