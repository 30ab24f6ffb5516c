# SPDX-License-Identifier: Apache-2.0
"""Where the merged checkpoint lives: the local cache on local storage, uploaded once to a
content-addressed key on object storage (a loopback S3 server here), and what the engine's
nodes need to read it. Fake checkpoints: no model is loaded."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from e2e_llm import storage
from e2e_llm.batch import MERGED_MARKER, Adapter, engine_env, merge, merged_model_name, merged_model_source, pipeline

SHA = "ab" * 32


@pytest.fixture
def adapter(tmp_path) -> Adapter:
    return Adapter(path=tmp_path / "adapter", sha256=SHA, rank=8, base_model="smollm2-135m")


@pytest.fixture
def cache(config, adapter, tmp_path) -> Path:
    """A finished local merge (what merged_model_dir leaves), so nothing is merged here."""
    cache = tmp_path / "cache"
    folder = cache / "merged" / merged_model_name(config, adapter)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    (folder / "tokenizer.json").write_text("{}")
    (folder / MERGED_MARKER).write_text(json.dumps({"adapter_sha256": SHA}))
    return cache


def _no_merge(*args, **kwargs):
    raise AssertionError("merged again although storage holds the merged model")


def test_key_names_model_adapter_sha_and_engine_dtype(config, adapter):
    assert merged_model_name(config, adapter) == f"smollm2-135m-{SHA[:16]}-float32"
    assert merged_model_name(config, adapter, "bfloat16") == f"smollm2-135m-{SHA[:16]}-bfloat16"
    other = Adapter(path=adapter.path, sha256="cd" * 32, rank=8, base_model=None)
    assert merged_model_name(config, other) != merged_model_name(config, adapter)


def test_local_storage_gives_the_engine_the_cached_folder_and_uploads_nothing(config, adapter, cache):
    merged = merged_model_source(config, adapter, "/models/base", cache_dir=cache)
    assert merged.source == str(cache / "merged" / merged_model_name(config, adapter))
    assert merged.uploaded is False
    assert not Path(config.storage_uri("merged")).exists()
    assert engine_env(config, merged.source) == {}


def test_remote_storage_uploads_the_merged_folder_once_marker_last(s3_config, adapter, cache, monkeypatch):
    merged = merged_model_source(s3_config, adapter, "/models/base", cache_dir=cache)
    key = s3_config.storage_uri("merged", f"smollm2-135m-{SHA[:16]}-float32")
    assert (merged.source, merged.uploaded) == (key, True)
    assert storage.list_dir(key) == sorted(["config.json", "hash", "model.safetensors", "tokenizer.json",
                                            MERGED_MARKER])
    # Ray's downloader names the node's snapshot folder after the "hash" object.
    assert storage.read_text(storage.join(key, "hash")).strip() == SHA
    assert storage.read_bytes(storage.join(key, "model.safetensors")) == b"\0" * 1024

    # Second run (any driver): the marker is there, so neither merge nor upload happens.
    monkeypatch.setattr(merge, "merged_model_dir", _no_merge)
    uploads = []
    monkeypatch.setattr(merge, "upload_merged", lambda *a, **k: uploads.append(a))
    again = merged_model_source(s3_config, adapter, "/models/base", cache_dir=cache)
    assert (again.source, again.uploaded, again.local_dir) == (key, False, None)
    assert uploads == []


def test_an_upload_without_its_marker_is_done_again(s3_config, adapter, cache):
    key = s3_config.storage_uri("merged", merged_model_name(s3_config, adapter))
    storage.write_text(storage.join(key, "config.json"), "partial")  # interrupted before the marker
    merged = merged_model_source(s3_config, adapter, "/models/base", cache_dir=cache)
    assert merged.uploaded is True
    assert storage.read_text(storage.join(key, "config.json")) == '{"model_type": "llama"}'
    assert storage.exists(storage.join(key, MERGED_MARKER))


def test_another_adapter_or_dtype_gets_its_own_key(s3_config, adapter, cache, tmp_path):
    first = merged_model_source(s3_config, adapter, "/models/base", cache_dir=cache)
    s3_config.batch.dtype = "bfloat16"
    (cache / "merged" / merged_model_name(s3_config, adapter)).mkdir()
    for f in (cache / "merged" / merged_model_name(s3_config, adapter, "float32")).iterdir():
        (cache / "merged" / merged_model_name(s3_config, adapter) / f.name).write_bytes(f.read_bytes())
    second = merged_model_source(s3_config, adapter, "/models/base", cache_dir=cache)
    assert second.uploaded is True and second.source != first.source
    assert second.source.endswith("-bfloat16")


def test_engine_nodes_get_the_s3_endpoint_and_region_not_credentials(config, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    config.storage.endpoint_url, config.storage.region = "http://minio:9000", "eu-west-1"
    env = engine_env(config, "s3://b/viggo/merged/m")
    assert env == {"AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    # The environment wins over the profile (as in e2e_llm.storage).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    assert engine_env(config, "s3://b/m")["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1234"
    assert engine_env(config, "/local/model") == {}
    assert engine_env(config, "gs://b/m") == {}


def test_processor_config_passes_the_endpoint_to_every_stage_for_a_remote_model(config, monkeypatch):
    pytest.importorskip("ray.data.llm")
    from e2e_llm.batch import processor_config

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    remote = processor_config(config, "s3://b/viggo/merged/m", None, "merged")
    assert remote.model_source == "s3://b/viggo/merged/m"
    assert remote.runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1234"
    local = processor_config(config, "/models/m", None, "merged").runtime_env["env_vars"]
    assert not any(k.startswith("AWS_") for k in local)


def test_a_cpu_engine_gets_the_serving_replicas_cpu_settings(config):
    pytest.importorskip("ray.data.llm")
    from e2e_llm.batch import processor_config
    from e2e_llm.serve import CPU_ENGINE_ENV

    assert config.batch.num_gpus_per_engine == 0
    env = processor_config(config, "/models/m", None, "merged").runtime_env["env_vars"]
    assert env == CPU_ENGINE_ENV and env["OMP_WAIT_POLICY"] == "PASSIVE"
    config.batch.num_gpus_per_engine = 1
    assert not processor_config(config, "/models/m", None, "merged").runtime_env


def test_driver_env_is_restored_after_building_the_processor(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pipeline._driver_env({"AWS_ENDPOINT_URL_S3": "http://x", "AWS_DEFAULT_REGION": "eu-west-1"}):
        assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://x"
        assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"  # already set: kept
    assert "AWS_ENDPOINT_URL_S3" not in os.environ and os.environ["AWS_DEFAULT_REGION"] == "us-east-1"


def test_the_merged_cache_keeps_the_adapters_used_last_and_drops_the_rest_once_idle(tmp_path):
    """Every `make e2e` merged a new adapter (~0.5 GB) into .cache/merged, and nothing removed
    any: 13 of them, 6.6 GB, after a day here."""
    from e2e_llm.batch.merge import KEEP_MERGED, MERGED_IDLE_S, MERGED_MARKER, prune_merged_cache

    now = 1_000_000.0
    ages = {"a": 10, "b": 20, "c": 30, "d": MERGED_IDLE_S + 40, "e": MERGED_IDLE_S + 50, "f": 60}
    for name, age in ages.items():  # f: used a minute ago, the 4th most recent: an engine may still load it
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"w")
        (tmp_path / name / MERGED_MARKER).write_text("{}")
        os.utime(tmp_path / name / MERGED_MARKER, (now - age, now - age))
    stale_tmp, fresh_tmp = tmp_path / "x-f32.tmp123", tmp_path / "y-f32.tmp456"  # merges that died / run now
    for folder, age in ((stale_tmp, MERGED_IDLE_S + 1), (fresh_tmp, 5)):
        folder.mkdir()
        os.utime(folder, (now - age, now - age))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert KEEP_MERGED == 3
    removed = prune_merged_cache(tmp_path, now=now)
    assert sorted(p.name for p in removed) == ["d", "e", "x-f32.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "f", "notes.txt", "y-f32.tmp456"]
    later = prune_merged_cache(tmp_path, now=now + MERGED_IDLE_S)  # f and the merge that ran then, once idle
    assert sorted(p.name for p in later) == ["f", "y-f32.tmp456"]
    assert prune_merged_cache(tmp_path / "missing") == []


def test_using_a_cached_merge_makes_it_recent_and_prunes_the_rest(config, tmp_path):
    from e2e_llm.batch import Adapter
    from e2e_llm.batch.merge import MERGED_IDLE_S, MERGED_MARKER, merged_model_dir, merged_model_name

    adapter = Adapter(path=tmp_path, sha256="ab" * 32, rank=16, base_model=None)
    cache = tmp_path / "cache"
    hit = cache / "merged" / merged_model_name(config, adapter, "float32")
    old = time.time() - 2 * MERGED_IDLE_S
    for i, folder in enumerate([hit] + [cache / "merged" / f"old-{i}" for i in range(4)]):
        folder.mkdir(parents=True)
        (folder / MERGED_MARKER).write_text("{}")
        os.utime(folder / MERGED_MARKER, (old - i, old - i))
    assert merged_model_dir(config, adapter, "/unused", cache_dir=cache, dtype="float32") == hit
    assert sorted(p.name for p in (cache / "merged").iterdir()) == sorted([hit.name, "old-0", "old-1"])
