# SPDX-License-Identifier: Apache-2.0
"""Unpacking a tar archive safely on every Python the project supports: tarfile's ``data`` filter
(refuses absolute paths, paths out of the destination, links out of it, devices) exists from
Python 3.11.4 on; Debian 12's python3.11 is 3.11.2, where ``extractall(filter=...)`` raised
TypeError (a KubeRay rollback failed on it). There the members are checked for the same."""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath


class UnsafeArchive(ValueError):
    """A member would land outside the destination, or is not a plain file or folder."""


def extract_all(tar: tarfile.TarFile, destination: str | Path) -> None:
    """Every member of ``tar`` under ``destination``, as tarfile's ``data`` filter allows."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(destination, filter="data")
        return
    members = tar.getmembers()
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise UnsafeArchive(f"{tar.name}: {member.name} would land outside {destination}")
        if not (member.isfile() or member.isdir()):
            raise UnsafeArchive(f"{tar.name}: {member.name} is not a plain file or folder")
    tar.extractall(destination, members=members)  # noqa: S202 - checked above, as the data filter would
