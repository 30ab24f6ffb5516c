# SPDX-License-Identifier: Apache-2.0
"""Training runs and their manifests: list them, find "latest", resolve an adapter reference.

"Latest" is the completed run with the newest ``finished_at`` in its manifest, never a
directory mtime. An adapter reference is a local path, a run id, ``latest``, or (when the
adapter store has one) a published name/alias.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.adapters import AdapterError, missing_adapter_files, require_adapter_files
from e2e_llm.config import PipelineConfig


def new_run_id(now: datetime | None = None) -> str:
    """A new run's id (training, batch, e2e): its UTC start time, so ids sort by start, and four
    random hex digits, so two pipelines started in the same second (a CI matrix, two people on one
    bucket) never write into one run folder."""
    return f"{now or datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class AdapterNotFound(LookupError):
    pass



def list_manifests(config: PipelineConfig) -> list[dict[str, Any]]:
    runs_uri = config.storage_uri("runs")
    manifests = []
    for run_id in storage.list_dir(runs_uri, **config.storage_kw()):
        uri = storage.join(runs_uri, run_id, "manifest.json")
        if storage.exists(uri, **config.storage_kw()):
            manifests.append(json.loads(storage.read_text(uri, **config.storage_kw())))
    return manifests


def latest_manifest(config: PipelineConfig) -> dict[str, Any]:
    done = [m for m in list_manifests(config) if m.get("status") == "completed"
            and m.get("base_model", {}).get("id") == config.model.id]
    if not done:
        raise AdapterNotFound(f"no completed training run for model {config.model.id!r} under "
                              f"{config.storage_uri('runs')}: run `e2e-llm train --profile {config.profile}`")
    return max(done, key=lambda m: m["finished_at"])


def check_adapter_dir(path: Path) -> Path:
    try:
        return require_adapter_files(path)
    except AdapterError as exc:
        raise AdapterNotFound(str(exc)) from None


def _local_copy(config: PipelineConfig, uri: str, key: str) -> Path:
    if not storage.is_remote(uri):
        return check_adapter_dir(Path(uri))
    from e2e_llm.model import default_cache_dir

    local = default_cache_dir(config.root) / "adapters" / key
    if missing_adapter_files(local):
        storage.download_dir(uri, local, **config.storage_kw())
    return check_adapter_dir(local)


def resolve_adapter(config: PipelineConfig, ref: str) -> tuple[Path, dict[str, Any] | None]:
    """(local adapter dir, its manifest or None) for a path, run id or ``latest``; an
    :class:`AdapterNotFound` names ``ref``."""
    try:
        return _resolve_adapter(config, ref)
    except AdapterNotFound as exc:
        raise AdapterNotFound(f"adapter {ref!r}: {exc}") from None


def _resolve_adapter(config: PipelineConfig, ref: str) -> tuple[Path, dict[str, Any] | None]:
    path = Path(ref).expanduser()
    if path.exists():
        manifest_path = path.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        return check_adapter_dir(path.resolve()), manifest
    if ref == "latest":
        manifest = latest_manifest(config)
    else:
        if "/" in ref or ref.startswith((".", "~")):  # meant as a folder, not a run id
            raise AdapterNotFound(f"no such folder {path}")
        uri = storage.join(config.storage_uri("runs"), ref, "manifest.json")
        if not storage.exists(uri, **config.storage_kw()):
            raise AdapterNotFound(f"not a folder, not 'latest', and no run {ref!r} under "
                                  f"{config.storage_uri('runs')}")
        manifest = json.loads(storage.read_text(uri, **config.storage_kw()))
    return _local_copy(config, manifest["adapter_uri"], manifest["run_id"]), manifest
