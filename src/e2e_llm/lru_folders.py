# SPDX-License-Identifier: Apache-2.0
"""Caches of folders on a machine's disk that keep the ones used last (the batch stage's merged
checkpoints, a serving machine's adapter downloads): one rule for which folders go and how.

A folder goes when it is beyond the ``keep`` used last and nobody used it for ``idle_s`` (a
reader may be about to open it). It is renamed aside before it is deleted, so a reader never finds
it half gone under its name, and where writers hold a lock on it (``guard``) that happens under the
lock, its last use read again there. Folders whose names start with a dot are not the cache's,
except those set aside here, which a crash may have left.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

ASIDE = ".pruned-"

LastUse = Callable[[Path], float | None]  # a folder's last use; None: not one this rule ranks


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:  # gone meanwhile
        return None


def prune(root: Path, keep: int, idle_s: float, last_use: LastUse = mtime,
          guard: Callable[[Path], AbstractContextManager] | None = None, now: float | None = None) -> list[Path]:
    """Remove the folders of ``root`` beyond the ``keep`` used last that nobody used for ``idle_s``
    (folders whose ``last_use`` is None are neither kept nor removed here); returns those removed."""
    try:
        folders = [p for p in root.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []
    for leftover in (p for p in folders if p.name.startswith(ASIDE)):
        shutil.rmtree(leftover, ignore_errors=True)
    used = {p: last_use(p) for p in folders if not p.name.startswith(".")}
    ranked = sorted((p for p, last in used.items() if last is not None), key=lambda p: used[p], reverse=True)
    return [p for p in ranked[keep:] if remove_if_idle(p, idle_s, last_use, guard, now)]


def remove_if_idle(folder: Path, idle_s: float, last_use: LastUse = mtime,
                   guard: Callable[[Path], AbstractContextManager] | None = None, now: float | None = None) -> bool:
    """Remove ``folder`` if nobody used it for ``idle_s``: renamed aside under ``guard(folder)``
    (skipped while another holds it), then deleted. Whether it went."""
    try:
        with (guard or nullcontext)(folder):
            last = last_use(folder)
            if last is None or (time.time() if now is None else now) - last < idle_s:
                return False
            aside = folder.with_name(f"{ASIDE}{folder.name}-{uuid.uuid4().hex[:8]}")
            os.replace(folder, aside)
    except OSError:  # the guard is held (a lock's timeout is a TimeoutError), or another pruner took it
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True
