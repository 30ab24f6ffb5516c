# SPDX-License-Identifier: Apache-2.0
"""This user's own folder in the temp dir of the machine a process runs on: where a serving
replica keeps downloaded adapters and a training worker its copy of the dataset and its outputs.
It is resolved on that machine (``TMPDIR`` there, else ``/tmp``), never on the driver, so a node
whose ``/tmp`` is small can point ``TMPDIR`` at a larger local disk."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

# The one folder name this project uses in a machine's temp dir (``<name>-<uid>``).
PROJECT_TEMP_NAME = "e2e-llm"


def own_temp_dir(name: str = PROJECT_TEMP_NAME) -> str:
    """``<temp dir>/<name>-<uid>``, this user's alone (mode 0700), made if missing. On a machine
    several people use, a shared ``/tmp/<name>`` belongs to whoever made it first: the others
    could not write there, and files in it that someone else can write would be loaded as
    adapter weights or training data. A folder of that name that another user owns or may write
    is refused."""
    path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise PermissionError(f"{path} is not this user's own folder (owner uid {info.st_uid}, mode "
                              f"{stat.filemode(info.st_mode)}): remove it, or point TMPDIR elsewhere")
    return path
