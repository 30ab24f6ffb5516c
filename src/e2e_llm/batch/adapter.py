# SPDX-License-Identifier: Apache-2.0
"""The adapter a batch run applies: resolved from a folder, a training run, ``latest`` or the
adapter store, and checked against the profile's base model (name and tensor shapes)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2e_llm.adapters import ADAPTER_FILES, AdapterError, require_adapter_files
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


def _model_names(config: PipelineConfig, model_path: str) -> set[str]:
    names = {config.model.id.lower(), Path(model_path.rstrip("/")).name.lower()}
    if config.model.source.startswith("hf:"):
        names.add(config.model.source.removeprefix("hf:").rsplit("/", 1)[-1].lower())
    return names


def adapter_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:  # what LoRA mode uploads
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_adapter(config: PipelineConfig, path: Path, model_path: str,
                  manifest: dict[str, Any] | None = None) -> Adapter:
    """Validate an adapter folder against the profile's base model; raise BatchError if it
    is missing, malformed or made for another base (by name and by tensor shapes)."""
    if not path.is_dir():
        raise BatchError(f"adapter {path}: directory not found")
    try:
        require_adapter_files(path)
    except AdapterError as exc:
        raise BatchError(f"adapter {exc}") from None
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise BatchError(f"{path / 'adapter_config.json'}: invalid JSON: {exc.msg}") from None
    rank = int(adapter_config.get("r") or 0)
    if rank <= 0:
        raise BatchError(f"{path / 'adapter_config.json'}: field 'r' missing (LoRA rank)")
    base = adapter_config.get("base_model_name_or_path")
    manifest_base = ((manifest or {}).get("base_model") or {}).get("id")
    wanted = _model_names(config, model_path)
    for label, value in (("adapter_config.json base_model_name_or_path", base), ("run manifest base_model.id",
                                                                                  manifest_base)):
        if value and Path(str(value).rstrip("/")).name.lower() not in wanted and str(value).lower() not in wanted:
            raise BatchError(f"adapter {path} was trained for another base model: {label} is {value!r}, "
                             f"profile {config.profile!r} uses {config.model.id!r} ({model_path})")
    # Shapes: a LoRA A matrix is [r, in_features]; in_features must exist in the base model.
    base_config_path = Path(model_path) / "config.json"
    if base_config_path.is_file():
        hf = json.loads(base_config_path.read_text())
        dims = {hf.get("hidden_size"), hf.get("intermediate_size")}
        heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
        if heads and hf.get("hidden_size"):
            head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
            dims |= {heads * head_dim, (kv or heads) * head_dim}
        layers = hf.get("num_hidden_layers")
        for key, shape in _safetensors_shapes(path / "adapter_model.safetensors").items():
            if "lora_A" in key and len(shape) == 2 and shape[1] not in dims:
                raise BatchError(f"adapter {path} does not fit base model {config.model.id!r}: {key} has input "
                                 f"size {shape[1]}, the model's layers take {sorted(d for d in dims if d)}")
            layer = int(key.split(".layers.")[1].split(".")[0]) if ".layers." in key else None
            if layers is not None and layer is not None and layer >= layers:
                raise BatchError(f"adapter {path} does not fit base model {config.model.id!r}: {key} targets "
                                 f"layer {layer}, the model has {layers}")
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
