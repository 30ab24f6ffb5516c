# SPDX-License-Identifier: Apache-2.0
"""This user's own folder in the temp dir of the machine a process runs on: where a serving
replica keeps downloaded adapters, a training worker its copy of the dataset and its outputs, and
a process that loads a base model kept in object storage its copy (:mod:`e2e_llm.model_mirror`).
What several processes of a machine read there is made once (:func:`fill_once`).
It is resolved on that machine (``TMPDIR`` there, else ``/tmp``), never on the driver, so a node
whose ``/tmp`` is small can point ``TMPDIR`` at a larger local disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

# The one folder name this project uses in a machine's temp dir (``<name>-<uid>``).
PROJECT_TEMP_NAME = "e2e-llm"
# Ray puts its Unix sockets at <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store
# (64 bytes at most after the temp dir), and a socket path may hold 107 bytes.
UNIX_SOCKET_PATH_MAX = 107
RAY_SOCKET_SUFFIX = len("/session_2026-12-07_09-09-09_496422_4194304/sockets/plasma_store")
# How long a process waits for another process of its machine to fill a folder (a download).
FILL_TIMEOUT_S = 3600.0


def own_temp_dir(name: str = PROJECT_TEMP_NAME, temp_dir: str | None = None) -> str:
    """``<temp dir>/<name>-<uid>`` (``temp_dir``: this machine's, else), this user's alone (mode
    0700), made if missing. On a machine
    several people use, a shared ``/tmp/<name>`` belongs to whoever made it first: the others
    could not write there, and files in it that someone else can write would be loaded as
    adapter weights or training data. A folder of that name that another user owns or may write
    is refused."""
    path = os.path.join(temp_dir or tempfile.gettempdir(), f"{name}-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not this user's own folder (owner uid {info.st_uid}, mode "
                              f"{stat.filemode(info.st_mode)}): remove it, or point TMPDIR elsewhere")
    return path


def ray_temp_dir_problem(path: str) -> str | None:
    """Why Ray cannot start in the temp dir ``path`` (``--ray-temp-dir``, ``RAY_TMPDIR``), or None:
    its socket paths under it would be too long, which Ray reports only as a traceback from
    ``ray.init`` ("AF_UNIX path length cannot exceed 107 bytes")."""
    longest = UNIX_SOCKET_PATH_MAX - RAY_SOCKET_SUFFIX
    full = os.path.abspath(path)
    if len(full.encode()) <= longest:
        return None
    return (f"{full} is {len(full.encode())} bytes long: Ray's socket paths under it would be over the "
            f"{UNIX_SOCKET_PATH_MAX} bytes a Unix socket path may hold; use a temp dir of at most {longest} "
            "(e.g. under /tmp)")


def fill_once(folder: Path, name: str, fill: Callable[[Path], None], timeout_s: float = FILL_TIMEOUT_S) -> Path:
    """``folder/name``, made by ``fill`` once however many processes of this machine ask at once:
    under an exclusive lock one process fills a temporary folder and renames it into place; the
    others wait for the lock and find it there. Only a finished fill is renamed in, so a folder
    found there is complete; what else is in ``folder`` (other names, a fill cut off by a crash)
    is removed by the next fill."""
    from e2e_llm.cas import locked

    target = folder / name
    if target.is_dir():
        return target
    with locked(folder, timeout_s=timeout_s):
        if target.is_dir():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.iterdir():
            remove(old)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
        try:
            fill(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
