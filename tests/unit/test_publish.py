# SPDX-License-Identifier: Apache-2.0
"""A trained adapter is published once per training run, whichever command publishes it first."""

from __future__ import annotations

import json
import shutil

import pytest

from e2e_llm.publish import publish_once, published_from_run
from e2e_llm.store import AdapterStore


@pytest.fixture
def run_adapter(tmp_path):
    path = tmp_path / "runs" / "r1" / "adapter"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "smollm2-135m"}))
    (path / "adapter_model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # no tensors
    return path


def test_a_second_publish_of_the_same_run_finds_the_first_version(config, tmp_path, run_adapter):
    store = AdapterStore(str(tmp_path / "store"))
    first, new = publish_once(config, store, run_adapter, {"run_id": "r1"})
    assert (first, new) == ("viggo-v1", True)
    # serve --publish and canary --adapter both land here: the same run, the same version
    assert publish_once(config, store, run_adapter, {"run_id": "r1"}) == ("viggo-v1", False)
    assert [v["id"] for v in store.versions("viggo")] == ["viggo-v1"]


def test_another_run_or_folder_is_a_new_version(config, tmp_path, run_adapter):
    store = AdapterStore(str(tmp_path / "store"))
    publish_once(config, store, run_adapter, {"run_id": "r1"})
    other = shutil.copytree(run_adapter, tmp_path / "runs" / "r2" / "adapter")
    assert published_from_run(store, "viggo", other, {"run_id": "r2"}) is None
    assert publish_once(config, store, other, {"run_id": "r2"}) == ("viggo-v2", True)
    # without a run id, the same folder is recognised by its source path
    assert publish_once(config, store, other, {}) == ("viggo-v2", False)


def test_an_adapter_for_another_base_model_is_not_published(config, tmp_path, run_adapter):
    """`e2e-llm publish --alias viggo` of an adapter trained on another base model moved the alias
    to it, and every request through the alias then failed to load it."""
    from e2e_llm.adapters import AdapterError
    from e2e_llm.publish import publish_new

    store = AdapterStore(str(tmp_path / "store"))
    config_file = run_adapter / "adapter_config.json"
    config_file.write_text(json.dumps({"r": 8, "base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct"}))
    with pytest.raises(AdapterError, match="was trained for another base model: adapter_config.json "
                                           "base_model_name_or_path is 'Qwen/Qwen2.5-7B-Instruct'"):
        publish_new(config, store, run_adapter, {"run_id": "r1"}, alias="viggo")
    config_file.write_text(json.dumps({"r": 8, "base_model_name_or_path": "smollm2-135m"}))
    with pytest.raises(AdapterError, match="run manifest base_model.id is 'qwen2.5-7b'"):
        publish_once(config, store, run_adapter, {"run_id": "r1", "base_model": {"id": "qwen2.5-7b"}})
    assert store.versions("viggo") == [] and store.aliases() == {}
