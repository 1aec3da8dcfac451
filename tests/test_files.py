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
