# SPDX-License-Identifier: Apache-2.0
"""The adapter a batch run applies: resolved from a folder, a training run, ``latest`` or the
adapter store, and checked against the profile's base model (name and tensor shapes)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_llm.adapters import ADAPTER_FILES, AdapterError, check_fits_base
from e2e_llm.batch.inputs import BatchError
from e2e_llm.batch.manifest import MANIFEST_FILE
from e2e_llm.config import PipelineConfig

STORE_PREFIX = "store:"


@dataclass
class Adapter:
    path: Path
    sha256: str
    rank: int
    base_model: str | None
    manifest: dict[str, Any] | None = None


def adapter_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:  # what LoRA mode uploads
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


def check_adapter(config: PipelineConfig, path: Path, model_path: str,
                  manifest: dict[str, Any] | None = None) -> Adapter:
    """The adapter folder, checked against the profile's base model (``adapters.check_fits_base``);
    raises BatchError naming what is missing, malformed or made for another base."""
    try:
        rank, base = check_fits_base(config, path, model_path, manifest)
    except AdapterError as exc:
        raise BatchError(str(exc)) from None
    return Adapter(path=path, sha256=adapter_sha256(path), rank=rank, base_model=base, manifest=manifest)


def resolve_adapter(config: PipelineConfig, ref: str | None, model_path: str) -> Adapter | None:
    """``none`` -> no adapter; a folder, training run id or ``latest`` (newest completed run,
    :func:`e2e_llm.runs.resolve_adapter`); or ``store:<alias|id|name:latest>``, a published
    adapter from the adapter store (what serving calls that name)."""
    if ref is None or ref.lower() == "none":
        return None
    manifest = None
    path = Path(ref).expanduser()
    if ref.startswith(STORE_PREFIX):
        from e2e_llm.model import default_cache_dir
        from e2e_llm.store import StoreError, fetch_adapter

        try:
            path, manifest = fetch_adapter(config, ref.removeprefix(STORE_PREFIX),
                                           default_cache_dir(config.root) / "store-adapters")
        except (StoreError, OSError) as exc:
            raise BatchError(f"adapter {ref!r}: {exc}") from None
    elif not path.exists():
        from e2e_llm.runs import resolve_adapter as resolve_run_adapter

        try:
            path, manifest = resolve_run_adapter(config, ref)
        except LookupError as exc:  # it names the adapter
            raise BatchError(str(exc)) from None
    else:
        parent_manifest = path.resolve().parent / MANIFEST_FILE
        if parent_manifest.is_file():
            manifest = json.loads(parent_manifest.read_text())
    return check_adapter(config, Path(path).resolve(), model_path, manifest)


def instruction_mismatch(adapter: Adapter | None, rows: list[dict[str, Any]], default: str,
                         where: str) -> str | None:
    """Why ``rows`` would not score ``adapter`` as it answers (:func:`e2e_llm.data.asked_otherwise`):
    they all ask with another instruction than its training rows did. None when they agree or
    either side is unknown."""
    from e2e_llm.data import ASKED_OTHERWISE, asked_otherwise, quoted

    found = asked_otherwise(adapter.manifest if adapter else None, rows, default)
    if found is None:
        return None
    trained, asked = found
    run = (adapter.manifest or {}).get("run_id")
    return (f"adapter {adapter.path} was trained on rows asking with the instruction {quoted(trained)}"
            f"{f' (training run {run})' if run else ''}, and every row of {where} asks with {quoted(asked)}: "
            f"{ASKED_OTHERWISE}, so these scores would not be its own. "
            "Score it on rows written with its instruction (`e2e-llm data` under a profile whose "
            "data.system_prompt is it, or null for the source's own)")
