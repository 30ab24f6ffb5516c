# SPDX-License-Identifier: Apache-2.0
"""The adapter rules (files of a LoRA folder, vLLM's LoRA ranks) and the stages that apply them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from e2e_llm.adapters import AdapterError, missing_adapter_files, require_adapter_files, vllm_max_lora_rank


def adapter_dir(path: Path, rank: int = 8, files=("adapter_config.json", "adapter_model.safetensors")) -> Path:
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text(json.dumps({"r": rank}) if name.endswith(".json") else "weights")
    return path


def test_lora_rank_rounds_up_to_what_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 4, 8, 12, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(AdapterError, match="LoRA rank 1024 is above vLLM's maximum 512"):
        vllm_max_lora_rank(1024)


def test_an_adapter_folder_needs_both_files(tmp_path):
    good = adapter_dir(tmp_path / "good")
    assert missing_adapter_files(good) == [] and require_adapter_files(good) == good
    half = adapter_dir(tmp_path / "half", files=("adapter_config.json",))
    assert missing_adapter_files(half) == ["adapter_model.safetensors"]
    with pytest.raises(AdapterError, match=r"half: not a LoRA adapter folder \(missing adapter_model.safetensors\)"):
        require_adapter_files(half)
    assert missing_adapter_files(tmp_path / "absent") == ["adapter_config.json", "adapter_model.safetensors"]


def test_training_runs_and_the_store_refuse_the_same_incomplete_folder(tmp_path, config):
    from e2e_llm.runs import AdapterNotFound, check_adapter_dir
    from e2e_llm.store import AdapterStore, StoreError

    half = adapter_dir(tmp_path / "half", files=("adapter_model.safetensors",))
    reason = r"not a LoRA adapter folder \(missing adapter_config.json\)"
    with pytest.raises(AdapterNotFound, match=reason):
        check_adapter_dir(half)
    with pytest.raises(StoreError, match=reason):
        AdapterStore(str(tmp_path / "store")).publish(half, name="viggo")


def test_serving_max_rank_follows_the_recipe_and_publishing_refuses_larger_adapters(tmp_path, config):
    from e2e_llm.serve import engine_kwargs, serving_max_lora_rank
    from e2e_llm.store import AdapterStore, StoreError

    assert serving_max_lora_rank(config) == 16 == engine_kwargs(config)["max_lora_rank"]  # local recipe: r16
    big = adapter_dir(tmp_path / "r32", rank=32)
    with pytest.raises(StoreError, match="rank 32 exceeds the serving max_lora_rank 16"):
        AdapterStore(str(tmp_path / "store")).publish(big, name="viggo", max_rank=serving_max_lora_rank(config))


def test_runs_started_in_the_same_second_get_their_own_ids():
    """Two pipelines started at once (a CI matrix, two people on one bucket) must not share a run
    folder; ids still sort by start time."""
    from datetime import UTC, datetime

    from e2e_llm.runs import new_run_id

    same_second = datetime(2026, 12, 6, 11, 30, 18, tzinfo=UTC)
    ids = {new_run_id(same_second) for _ in range(50)}
    assert len(ids) > 45 and all(i.startswith("20261206-113018-") for i in ids)
    assert new_run_id(datetime(2026, 12, 6, 11, 30, 19, tzinfo=UTC)) > max(ids)
