# SPDX-License-Identifier: Apache-2.0
"""Putting what the engine loads where remote worker nodes can read it: uploads that are done
once (content-addressed keys, completion marker last), and LoRA mode's adapter source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.adapters import ADAPTER_FILES
from e2e_llm.batch.adapter import Adapter
from e2e_llm.config import PipelineConfig

LORA_MARKER = "e2e_llm_lora.json"


def upload_once(local_dir: Path, uri: str, revision: str, *, files: list[Path], marker: str, marker_data: bytes,
                **kw: Any) -> None:
    """Copy ``files`` (under ``local_dir``) to ``uri``, the completion marker last: a folder
    without the marker (an interrupted upload) is uploaded again by the next run.

    ``revision`` goes to the optional ``hash`` object Ray's downloader reads
    (Ray's ``CloudFileSystem.download_model``, ray.llm's common/utils/cloud_utils.py): it
    names the snapshot folder on each node, and without it Ray logs an error before using zeros.
    """
    from pyarrow import fs as pafs

    dest_fs, dest = storage.filesystem(uri, **kw)
    for path in sorted(files):
        # One object per file (pyarrow streams a large shard as a multipart upload).
        pafs.copy_files(str(path), f"{dest}/{path.relative_to(local_dir).as_posix()}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest_fs)
    storage.write_text(storage.join(uri, "hash"), revision + "\n", **kw)
    storage.write_bytes(storage.join(uri, marker), marker_data, **kw)


def lora_adapter_name(config: PipelineConfig, adapter: Adapter) -> str:
    """``<model>-lora-<adapter sha256[:16]>``: the adapter's storage key and its name in rows."""
    return f"{config.model.id}-lora-{adapter.sha256[:16]}"


@dataclass
class LoraSource:
    """How LoRA mode names the adapter: ``name`` goes into each row's ``model``; with
    ``loading_path`` (``dynamic_lora_loading_path``) the engine downloads ``<loading_path>/<name>``,
    without it ``name`` is the local folder. ``source``: where the engine loads it from."""

    name: str
    source: str
    loading_path: str | None = None
    uploaded: bool = False


def lora_source(config: PipelineConfig, adapter: Adapter) -> LoraSource:
    """The adapter for LoRA mode. Local storage: its folder, named by path (today's behaviour).
    Remote storage: GPU worker nodes cannot read the driver's disk, so the adapter files are
    uploaded once to ``<storage>/lora/<model>-lora-<adapter sha>/`` (content-addressed, marker
    last, skipped when the marker is there) and rows name it by that folder name.

    Ray 2.60 resolves a row's ``model`` that differs from ``model_source`` as a LoRA
    (batch/stages/vllm_engine_stage.py, ``vLLMEngineStageUDF._maybe_get_lora_request``): with
    ``dynamic_lora_loading_path`` set, ``download_lora_adapter`` (common/utils/lora_utils.py)
    downloads ``<dynamic_lora_loading_path>/<name>`` with ``CloudModelDownloader``
    (common/utils/download_utils.py) into the node's HF cache, snapshot named by the ``hash``
    object; a remote URI as the row's ``model`` is refused."""
    if not storage.is_remote(config.storage.root):
        return LoraSource(name=str(adapter.path), source=str(adapter.path))
    parent = config.storage_uri("lora")
    name = lora_adapter_name(config, adapter)
    uri = storage.join(parent, name)
    if storage.exists(storage.join(uri, LORA_MARKER), **config.storage_kw()):
        return LoraSource(name=name, source=uri, loading_path=parent)
    marker = json.dumps({"adapter": str(adapter.path), "adapter_sha256": adapter.sha256}) + "\n"
    upload_once(adapter.path, uri, adapter.sha256, files=[adapter.path / f for f in ADAPTER_FILES], marker=LORA_MARKER,
                marker_data=marker.encode(), **config.storage_kw())
    return LoraSource(name=name, source=uri, loading_path=parent, uploaded=True)
