# SPDX-License-Identifier: Apache-2.0
"""The GPU bench profile (bench/device_ray.py) is the cluster profile with only what the device forces."""

import importlib.util
import sys

import pytest
import yaml

from e2e_llm.config import load_profile
from e2e_llm.pins import lock_pins


def _device_ray(project_root):
    sys.path.insert(0, str(project_root / "bench"))
    spec = importlib.util.spec_from_file_location("device_ray", project_root / "bench" / "device_ray.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_profile_differs_from_cluster_only_in_forced_keys(project_root, tmp_path, monkeypatch):
    monkeypatch.delenv("E2E_LLM_STORAGE_ROOT", raising=False)
    dr = _device_ray(project_root)
    cluster = yaml.safe_load((project_root / "configs/profiles/cluster.yaml").read_text())
    prof = dr.gpu_profile(str(tmp_path / "model"), str(tmp_path / "store"))
    assert dr.profile_diff(cluster, prof) == [
        "model.source", "profile", "storage.root", "train.accelerator_type", "train.num_workers"]
    # what makes it the GPU path stays the cluster's
    assert prof["train"]["use_gpu"] is True
    assert prof["train"]["resources_per_worker"] == cluster["train"]["resources_per_worker"]
    assert prof["train"]["recipe"] == cluster["train"]["recipe"]
    assert prof["train"]["max_failures"] == cluster["train"]["max_failures"]
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(prof))
    config = load_profile(str(path), root=project_root)
    assert config.train.use_gpu and config.train.num_workers == 1
    assert config.train.accelerator_type == "H200"
    assert config.storage_uri("runs") == str(tmp_path / "store" / "runs")
    # the float16 run (what V100/T4 users pin) changes model.dtype and nothing else
    fp16 = dr.gpu_profile(str(tmp_path / "model"), str(tmp_path / "store"), dtype="float16")
    assert dr.profile_diff(prof, fp16) == ["model.dtype"] and fp16["model"]["dtype"] == "float16"


def test_profile_diff_reports_any_other_change(project_root):
    dr = _device_ray(project_root)
    cluster = yaml.safe_load((project_root / "configs/profiles/cluster.yaml").read_text())
    changed = yaml.safe_load((project_root / "configs/profiles/cluster.yaml").read_text())
    changed["train"]["use_gpu"] = False
    changed["batch"]["engine_kwargs"] = {"enforce_eager": True}
    assert dr.profile_diff(cluster, changed) == ["batch.engine_kwargs", "train.use_gpu"]
    assert dr.profile_diff(cluster, cluster) == []


def test_accelerator_type_is_the_label_ray_gives_the_card(project_root, tmp_path, monkeypatch):
    from ray.util import accelerators

    dr = _device_ray(project_root)
    assert dr.ray_accelerator_type("NVIDIA H100 80GB HBM3") == accelerators.NVIDIA_H100
    assert dr.ray_accelerator_type("NVIDIA H200") == "H200"  # (H200, A10G: not re-exported by ray.util.accelerators)
    assert dr.ray_accelerator_type("NVIDIA A10G") == "A10G"
    assert dr.ray_accelerator_type("cpu") is None
    # on an H100 the GPU profile keeps the cluster profile's own accelerator type
    monkeypatch.delenv("E2E_LLM_STORAGE_ROOT", raising=False)
    cluster = yaml.safe_load((project_root / "configs/profiles/cluster.yaml").read_text())
    prof = dr.gpu_profile(str(tmp_path / "model"), str(tmp_path / "store"),
                          accelerator_type=dr.ray_accelerator_type("NVIDIA H100 80GB HBM3"))
    assert "train.accelerator_type" not in dr.profile_diff(cluster, prof)


def test_gpu_machine_wheels_are_the_train_locks_pins(project_root, tmp_path, monkeypatch):
    device_ray = _device_ray(project_root)
    device = sys.modules["_device"]
    specs = device.train_lock_specs(device.WHEELS + device_ray.EXTRA_WHEELS)
    assert "ray==" + lock_pins(project_root / "images/train/requirements.lock")["ray"] in specs
    assert any(s.startswith("llamafactory==") for s in specs) and len(specs) == len(set(specs))
    # A lock bump reaches the GPU machine; a name the lock lacks is an error naming it.
    lock = tmp_path / "requirements.lock"
    lock.write_text("Ray==9.9.9\npydantic_core==1.0  # comment\n")
    monkeypatch.setattr(device, "TRAIN_LOCK", lock)
    monkeypatch.setattr(device, "ROOT", tmp_path)
    assert device.train_lock_specs(("ray", "pydantic-core")) == ["ray==9.9.9", "pydantic-core==1.0"]
    with pytest.raises(SystemExit, match="requirements.lock pins no llamafactory"):
        device.train_lock_specs(("llamafactory", "ray"))
