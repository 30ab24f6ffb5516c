# SPDX-License-Identifier: Apache-2.0
"""What a LoRA adapter folder is, and the LoRA ranks vLLM accepts: one home for both rules.

A peft LoRA adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
(what training writes, the store publishes, batch merges or loads, and vLLM reads). vLLM's
``max_lora_rank`` must be one of ``VLLM_LORA_RANKS`` and at least the adapter's rank.
"""

from __future__ import annotations

from pathlib import Path

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
