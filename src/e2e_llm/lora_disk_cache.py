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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e_llm import lru_folders
from e2e_llm.adapters import missing_adapter_files

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


def mark_used(folder: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: the next request downloads it again
        os.utime(folder)


def prune(root: str, max_versions: int, min_idle_s: float, lock_path: Callable[[str], str]) -> list[str]:
    """Remove the adapter folders of ``root`` beyond the ``max_versions`` most recently used that
    nobody used for ``min_idle_s``, each under the lock its downloads take (``lock_path(folder)``;
    skipped while held), where a request marks its folder used too (:mod:`e2e_llm.lru_folders`).
    Returns their names."""
    from filelock import FileLock

    def download_lock(folder: Path) -> FileLock:
        return FileLock(lock_path(str(folder)), timeout=0)

    return [p.name for p in lru_folders.prune(Path(root), max_versions, min_idle_s, guard=download_lock)]
