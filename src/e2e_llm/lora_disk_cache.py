# SPDX-License-Identifier: Apache-2.0
"""How many adapter versions a serving machine keeps on disk.

Ray Serve LLM downloads each adapter a replica is asked for into a folder of its own
(``server.lora_cache_dir``: one root per adapter store and machine) and never removes one; vLLM
keeps that folder's path and reloads the weights from it whenever its LoRA cache has evicted them.
A service that runs for months while a new version is published every day filled its node's disk
(on Kubernetes, the pod's ephemeral storage: eviction). So:

- each request marks its adapter's folder used (the folder's mtime) and, where the folder was
  removed, downloads it again before the engine may read it (``compat.ray_serve.PrunedLoraLoader``);
- after each download, the folders beyond the ``max_versions`` most recently used are removed,
  except one used in the last ``min_idle_s`` or one another replica is downloading into.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e_llm.adapters import missing_adapter_files

REMOVING = ".removing-"
# LLMConfig.experimental_configs keys the replica reads the profile's serve.adapter_cache from.
SETTINGS_PREFIX = "adapter_cache_"


def adapter_cache_settings(limits: Any) -> dict[str, Any]:
    """``serve.adapter_cache`` as experimental_configs entries."""
    return {f"{SETTINGS_PREFIX}{key}": value for key, value in limits.model_dump().items()}


def limits_from_settings(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """The limits :func:`adapter_cache_settings` wrote (``max_versions``, ``min_idle_s``), or None
    for an app that set none (Ray's loader then keeps every version, as before)."""
    limits = {key.removeprefix(SETTINGS_PREFIX): value for key, value in (settings or {}).items()
              if key.startswith(SETTINGS_PREFIX)}
    return limits or None


def is_complete(folder: str) -> bool:
    return os.path.isdir(folder) and not missing_adapter_files(Path(folder))


def last_use(folder: str) -> float:
    try:
        return os.stat(folder).st_mtime
    except FileNotFoundError:
        return float("-inf")


def mark_used(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: the next request downloads it again
        os.utime(folder)


def prune(root: str, max_versions: int, min_idle_s: float, lock_path: Callable[[str], str]) -> list[str]:
    """Remove the adapter folders of ``root`` beyond the ``max_versions`` most recently used that
    nobody used for ``min_idle_s``; returns their names. A folder is renamed away under the lock
    its downloads take (``lock_path(folder)``, skipped while held) and only then deleted, so a
    folder under an adapter's name is never half there."""
    from filelock import FileLock, Timeout

    try:
        entries = [entry for entry in os.scandir(root) if entry.is_dir()]
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(REMOVING):  # a removal cut off by a crash
            shutil.rmtree(entry.path, ignore_errors=True)
    folders = [entry for entry in entries if not entry.name.startswith(".")]
    folders.sort(key=lambda entry: last_use(entry.path), reverse=True)
    removed = []
    for entry in folders[max_versions:]:
        try:
            with FileLock(lock_path(entry.path), timeout=0):
                # Read under the lock: a request marks its folder used under it too.
                if time.time() - last_use(entry.path) < min_idle_s:
                    continue
                doomed = os.path.join(root, f"{REMOVING}{entry.name}-{uuid.uuid4().hex[:8]}")
                os.rename(entry.path, doomed)
        except (Timeout, FileNotFoundError):  # being downloaded into, or gone already
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(entry.name)
    return removed
