# SPDX-License-Identifier: Apache-2.0
"""What a LoRA adapter folder is, which base model it fits, and the LoRA ranks vLLM accepts:
one home for these rules.

A peft LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(what training writes, the store publishes, batch merges or loads, and vLLM reads). It fits a
base model when the names it records agree and its LoRA tensors' shapes fit the model's layers
(:func:`check_fits_base`: batch before its engine starts, publish before an alias can point at
it). vLLM's ``max_lora_rank`` must be one of ``VLLM_LORA_RANKS`` and at least the adapter's rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e2e_llm.config import PipelineConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# vLLM accepts only these values for max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class AdapterError(ValueError):
    """Not a LoRA adapter folder, or a rank vLLM cannot serve."""


def missing_adapter_files(path: str | Path) -> list[str]:
    """The adapter files ``path`` lacks (empty: it is an adapter folder)."""
    return [name for name in ADAPTER_FILES if not (Path(path) / name).is_file()]


def require_adapter_files(path: str | Path) -> Path:
    """``path`` if it holds every adapter file; an :class:`AdapterError` naming what is missing."""
    if missing := missing_adapter_files(path):
        raise AdapterError(f"{path}: not a LoRA adapter folder (missing {', '.join(missing)})")
    return Path(path)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that fits an adapter of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise AdapterError(f"LoRA rank {rank} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def _model_names(config: PipelineConfig, model_path: str) -> set[str]:
    names = {config.model.id.lower(), Path(model_path.rstrip("/")).name.lower()}
    if config.model.source.startswith("hf:"):
        names.add(config.model.source.removeprefix("hf:").rsplit("/", 1)[-1].lower())
    return names


def _base_config_file(config: PipelineConfig, model_path: str) -> Path | None:
    """The base model's ``config.json`` where this machine reads it: a local folder's, or an
    object-store model's (its copy without weights, :mod:`e2e_llm.model_mirror`); None for a hub
    id, or a store this machine cannot read (the shapes go unchecked, as before any copy)."""
    from e2e_llm import storage

    if storage.is_remote(model_path):
        from e2e_llm.model_mirror import ModelMirrorError, local_copy

        try:
            return local_copy(model_path, config.object_store_kw(), weights=False) / "config.json"
        except (OSError, ModelMirrorError):
            return None
    path = Path(model_path) / "config.json"
    return path if path.is_file() else None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_fits_base(config: PipelineConfig, path: Path, model_path: str,
                    manifest: dict[str, Any] | None = None) -> tuple[int, str | None]:
    """(LoRA rank, recorded base model) of the adapter folder ``path``, after checking that it fits
    the profile's base model (at ``model_path``) by the names it records and by its tensor shapes;
    raises :class:`AdapterError` naming what does not fit."""
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: directory not found")
    try:
        require_adapter_files(path)
    except AdapterError as exc:
        raise AdapterError(f"adapter {exc}") from None
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path / 'adapter_config.json'}: invalid JSON: {exc.msg}") from None
    rank = int(adapter_config.get("r") or 0)
    if rank <= 0:
        raise AdapterError(f"{path / 'adapter_config.json'}: field 'r' missing (LoRA rank)")
    base = adapter_config.get("base_model_name_or_path")
    manifest_base = ((manifest or {}).get("base_model") or {}).get("id")
    wanted = _model_names(config, model_path)
    for label, value in (("adapter_config.json base_model_name_or_path", base), ("run manifest base_model.id",
                                                                                  manifest_base)):
        if value and Path(str(value).rstrip("/")).name.lower() not in wanted and str(value).lower() not in wanted:
            raise AdapterError(f"adapter {path} was trained for another base model: {label} is {value!r}, "
                               f"profile {config.profile!r} uses {config.model.id!r} ({model_path})")
    # Shapes: a LoRA A matrix is [r, in_features]; in_features must exist in the base model.
    base_config_path = _base_config_file(config, model_path)
    if base_config_path is not None:
        hf = json.loads(base_config_path.read_text())
        dims = {hf.get("hidden_size"), hf.get("intermediate_size")}
        heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
        if heads and hf.get("hidden_size"):
            head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
            dims |= {heads * head_dim, (kv or heads) * head_dim}
        layers = hf.get("num_hidden_layers")
        for key, shape in _safetensors_shapes(path / "adapter_model.safetensors").items():
            if "lora_A" in key and len(shape) == 2 and shape[1] not in dims:
                raise AdapterError(f"adapter {path} does not fit base model {config.model.id!r}: {key} has input "
                                   f"size {shape[1]}, the model's layers take {sorted(d for d in dims if d)}")
            layer = int(key.split(".layers.")[1].split(".")[0]) if ".layers." in key else None
            if layers is not None and layer is not None and layer >= layers:
                raise AdapterError(f"adapter {path} does not fit base model {config.model.id!r}: {key} targets "
                                   f"layer {layer}, the model has {layers}")
    return rank, base
