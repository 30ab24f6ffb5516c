# SPDX-License-Identifier: Apache-2.0
"""``merged`` adapter mode: the adapter folded into the base weights once (fp32 merge, saved in
the engine dtype, cached by adapter sha256) and, on remote storage, uploaded once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.batch.adapter import Adapter
from e2e_llm.batch.upload import upload_once
from e2e_llm.config import PipelineConfig

MERGED_MARKER = "e2e_llm_merged.json"
# The local cache keeps the merged checkpoints of the adapters used last: one per trained adapter
# (~0.5 GB for SmolLM2 in fp32) piled up at every `make e2e` (6.6 GB after a day's work here).
# Scoring the last few runs again merges nothing; an older one goes once no engine can still be
# loading it (an engine reads its checkpoint at start, and a batch run starts its engines within
# minutes; a rerun merges it again, in seconds for SmolLM2).
KEEP_MERGED = 3
MERGED_IDLE_S = 3600


def merged_model_name(config: PipelineConfig, adapter: Adapter, dtype: str | None = None) -> str:
    """``<model>-<adapter sha256[:16]>-<dtype>``: the merged checkpoint's cache folder and storage key."""
    from e2e_llm.precision import batch_dtype

    return f"{config.model.id}-{adapter.sha256[:16]}-{dtype or batch_dtype(config).dtype}"


def merged_model_dir(config: PipelineConfig, adapter: Adapter, model_path: str, cache_dir: Path | None = None,
                     dtype: str | None = None) -> Path:
    """Fold the adapter into the base weights once (fp32 merge, saved in the engine dtype)."""
    from e2e_llm.model import default_cache_dir, replace_dir
    from e2e_llm.precision import batch_dtype, torch_dtype

    dtype_name = dtype or batch_dtype(config).dtype
    out = (cache_dir or default_cache_dir(config.root)) / "merged" / merged_model_name(config, adapter, dtype_name)
    if (out / MERGED_MARKER).is_file():
        os.utime(out / MERGED_MARKER)  # used now: the cache's recency
        prune_merged_cache(out.parent)
        return out
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e2e_llm.model_mirror import loadable

    dtype = torch_dtype(dtype_name)
    base_path = loadable(model_path, config.object_store_kw())  # a URI: copied to this machine
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter.path)).merge_and_unload()
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(tmp)
    (tmp / MERGED_MARKER).write_text(json.dumps({"base": model_path, "adapter": str(adapter.path),
                                                 "adapter_sha256": adapter.sha256, "dtype": dtype_name}) + "\n")
    if (out / MERGED_MARKER).is_file():  # another batch run merged the same adapter meanwhile, and may read it
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(tmp, out)
    prune_merged_cache(out.parent)
    return out


def prune_merged_cache(root: Path, keep: int = KEEP_MERGED, idle_s: float = MERGED_IDLE_S,
                       now: float | None = None) -> list[Path]:
    """Remove the merged checkpoints under ``root`` beyond the ``keep`` used last (by their
    marker's time), and unfinished merges, where untouched for ``idle_s``; returns what went
    (:mod:`e2e_llm.lru_folders`)."""
    from e2e_llm import lru_folders

    def used(folder: Path) -> float | None:
        return lru_folders.mtime(folder / MERGED_MARKER)

    removed = lru_folders.prune(root, keep, idle_s, last_use=used, now=now)
    unfinished = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and ".tmp" in p.name
                  and used(p) is None] if root.is_dir() else []
    return removed + [p for p in unfinished if lru_folders.remove_if_idle(p, idle_s, now=now)]


@dataclass
class MergedModel:
    """Where the engine reads the merged checkpoint from (``source``: the local folder, or
    ``<storage>/merged/<name>`` on remote storage) and what this run did to put it there."""

    source: str
    local_dir: Path | None  # the local merge; None when remote storage already held it (no merge)
    uploaded: bool = False


def upload_merged(local_dir: Path, uri: str, revision: str, **kw: Any) -> None:
    """Upload a merged checkpoint folder (:func:`upload_once`, its cache marker last)."""
    files = [p for p in local_dir.rglob("*") if p.is_file() and p.name != MERGED_MARKER]
    upload_once(local_dir, uri, revision, files=files, marker=MERGED_MARKER,
                marker_data=(local_dir / MERGED_MARKER).read_bytes(), **kw)


def merged_model_source(config: PipelineConfig, adapter: Adapter, model_path: str,
                        cache_dir: Path | None = None) -> MergedModel:
    """The merged checkpoint for the engine. Local storage: the cached folder. Remote storage
    (s3://, gs://): GPU worker nodes cannot see the driver's disk, so the folder is uploaded
    once to ``<storage>/merged/<model>-<adapter sha>-<dtype>/`` (content-addressed; when that
    key already holds the completion marker, neither merge nor upload runs) and the engine is
    given that URI, which ray.data.llm downloads on each node (see :func:`engine_env`)."""
    if not storage.is_remote(config.storage.root):
        local = merged_model_dir(config, adapter, model_path, cache_dir)
        return MergedModel(source=str(local), local_dir=local)
    uri = config.storage_uri("merged", merged_model_name(config, adapter))
    if storage.exists(storage.join(uri, MERGED_MARKER), **config.storage_kw()):
        return MergedModel(source=uri, local_dir=None)
    local = merged_model_dir(config, adapter, model_path, cache_dir)
    upload_merged(local, uri, revision=adapter.sha256, **config.storage_kw())
    return MergedModel(source=uri, local_dir=local, uploaded=True)
