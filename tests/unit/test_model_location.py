# SPDX-License-Identifier: Apache-2.0
"""Where the base model is loaded from: one rule for training, batch and the serving replicas."""

from __future__ import annotations

import pytest

from e2e_llm.config import ModelConfig
from e2e_llm.model import READY_MARKER, ModelError, model_location, resolve_model_path


def test_each_source_kind_has_one_location(tmp_path):
    cache = tmp_path / "cache"
    assert model_location(ModelConfig(id="m", source="pypi:pkg/m.gguf"), cache) == str(cache / "models" / "m")
    assert model_location(ModelConfig(id="m", source="hf:Qwen/Qwen2.5-7B-Instruct")) == "Qwen/Qwen2.5-7B-Instruct"
    assert model_location(ModelConfig(id="m", source="s3://bucket/models/m")) == "s3://bucket/models/m"
    assert model_location(ModelConfig(id="m", source="models/m"), root=tmp_path) == str(tmp_path / "models" / "m")
    assert model_location(ModelConfig(id="m", source="/abs/m"), root=tmp_path) == "/abs/m"


def test_resolving_checks_what_this_machine_must_have(tmp_path):
    pypi = ModelConfig(id="m", source="pypi:pkg/m.gguf")
    with pytest.raises(ModelError, match="is not prepared at .*run `e2e-llm model`"):
        resolve_model_path(pypi, tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / READY_MARKER).write_text("{}")
    assert resolve_model_path(pypi, tmp_path) == str(tmp_path / "models" / "m")
    with pytest.raises(ModelError, match=f"model path {tmp_path}/nope does not exist"):
        resolve_model_path(ModelConfig(id="m", source="nope"), root=tmp_path)
    assert resolve_model_path(ModelConfig(id="m", source="hf:org/m")) == "org/m"  # the engine fetches it


def test_serving_replicas_load_the_model_from_the_same_location(local_config, monkeypatch, tmp_path):
    from e2e_llm.serve import app_args

    monkeypatch.setenv("E2E_LLM_CACHE", str(tmp_path))
    source = app_args(local_config)["llm_configs"][0]["model_loading_config"]["model_source"]
    assert source == model_location(local_config.model, root=local_config.root) == str(tmp_path / "models/smollm2-135m")


def test_a_command_run_from_a_subfolder_uses_the_project_cache(local_config, monkeypatch, tmp_path):
    """Without $E2E_LLM_CACHE (a shell, not make), the cache is the project root's, not the cwd's."""
    from e2e_llm.model import default_cache_dir

    monkeypatch.delenv("E2E_LLM_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = str(local_config.root.resolve() / ".cache" / "models" / local_config.model.id)
    assert model_location(local_config.model, root=local_config.root) == expected
    assert default_cache_dir() == tmp_path.resolve() / ".cache"  # no root given: the cwd, as before
    monkeypatch.setenv("E2E_LLM_CACHE", str(tmp_path / "elsewhere"))
    assert model_location(local_config.model, root=local_config.root) == str(
        tmp_path / "elsewhere" / "models" / local_config.model.id)


def test_two_pipelines_preparing_the_model_at_once_convert_it_once(tmp_path, monkeypatch):
    """A first `make e2e` beside another: they shared one temporary folder, each deleting what the
    other was writing. Now one converts while the other waits, then finds the model."""
    import threading
    import time

    from e2e_llm import model as model_module
    from e2e_llm.model import prepare_model, prepared_dtype

    gguf = tmp_path / "cache" / "pypi" / "pkg" / "m.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    conversions = []

    def convert(_gguf, dest, dtype):
        conversions.append(dtype)
        time.sleep(0.3)  # long enough for the other preparer to arrive
        (dest / "model.safetensors").write_text(dtype)

    monkeypatch.setattr(model_module, "convert_gguf", convert)
    config = ModelConfig(id="m", source="pypi:pkg/m.gguf")
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_model(config, tmp_path / "cache",
                                                                            dtype="float32")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    out = tmp_path / "cache" / "models" / "m"
    assert results == [out, out] and conversions == ["float32"] and prepared_dtype(out) == "float32"

    # Another dtype replaces it whole, and leaves no temporary or set-aside folder behind.
    with open(out / "model.safetensors") as reader:  # a process still reading the old one
        assert prepare_model(config, tmp_path / "cache", dtype="bfloat16") == out
        assert reader.read() == "float32"
    assert prepared_dtype(out) == "bfloat16" and (out / "model.safetensors").read_text() == "bfloat16"
    assert sorted(p.name for p in out.parent.iterdir()) == [".m.lock", "m"]
