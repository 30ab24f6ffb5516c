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


def test_a_ray_temp_dir_too_long_for_its_sockets_is_refused_before_ray_starts(capsys, tmp_path):
    """Ray's own error is a traceback from ray.init: "AF_UNIX path length cannot exceed 107 bytes"."""
    from e2e_llm.cli import main
    from e2e_llm.node_temp import RAY_SOCKET_SUFFIX, UNIX_SOCKET_PATH_MAX, ray_temp_dir_problem

    longest = UNIX_SOCKET_PATH_MAX - RAY_SOCKET_SUFFIX
    assert ray_temp_dir_problem("/tmp/ray-e2e-4294967294-serve-4194304") is None  # what `make e2e` passes
    assert ray_temp_dir_problem("/" + "x" * (longest - 1)) is None
    long = "/tmp/" + "d" * longest
    assert ray_temp_dir_problem(long) == (
        f"{long} is {len(long)} bytes long: Ray's socket paths under it would be over the 107 bytes a Unix "
        f"socket path may hold; use a temp dir of at most {longest} (e.g. under /tmp)")
    for command in ("train", "serve"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--ray-temp-dir", long])
        assert exit_.value.code == 2 and f"--ray-temp-dir: {long} is {len(long)} bytes long" in capsys.readouterr().err
    # the kernel's limit the figure stands for: a Unix socket path of 107 bytes binds, 108 do not
    import socket

    base = tmp_path / "s"
    base.mkdir()
    for size, binds in ((UNIX_SOCKET_PATH_MAX, True), (UNIX_SOCKET_PATH_MAX + 1, False)):
        path = str(base) + "/" + "p" * (size - len(str(base)) - 1)
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.bind(path)
                bound = True
            except OSError:
                bound = False
        assert bound is binds, (size, path)
