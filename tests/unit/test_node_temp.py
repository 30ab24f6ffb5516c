# SPDX-License-Identifier: Apache-2.0
"""This user's own folder in a machine's temp dir (adapter downloads, training workers' files)."""

import os
import stat
import tempfile
from pathlib import Path

import pytest

from e2e_llm.node_temp import own_temp_dir


def test_the_folder_is_this_users_alone_and_follows_tmpdir(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # TMPDIR on that machine
    own = tmp_path / f"e2e-llm-{os.getuid()}"
    assert own_temp_dir() == str(own) and stat.S_IMODE(own.stat().st_mode) == 0o700
    (own / "kept").write_text("")
    assert own_temp_dir() == str(own) and (own / "kept").exists()  # made once, then reused


@pytest.mark.parametrize("spoil, message", [
    (lambda p: p.chmod(0o777), "mode drwxrwxrwx"),               # anyone could plant adapter files
    (lambda p: (p.rmdir(), p.write_text("")), "mode -rw-"),        # not a folder
])
def test_a_temp_folder_others_can_write_is_refused(monkeypatch, tmp_path, spoil, message):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = Path(own_temp_dir())
    spoil(folder)
    with pytest.raises(PermissionError, match=f"is not this user's own folder .*{message}"):
        own_temp_dir()


@pytest.mark.skipif(os.getuid() != 0, reason="making a folder another user owns needs root")
def test_a_temp_folder_another_user_owns_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    os.chown(own_temp_dir(), 65534, 65534)
    with pytest.raises(PermissionError, match="owner uid 65534"):
        own_temp_dir()
