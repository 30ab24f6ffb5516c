# SPDX-License-Identifier: Apache-2.0
"""How LoRA mode names the adapter: by its local folder on local storage; on object storage (a
loopback S3 server here) uploaded once under a content-addressed name that rows carry and the
engine resolves against ``dynamic_lora_loading_path``. Fake adapter files: no model is loaded."""

from __future__ import annotations

import json

import pytest

from e2e_llm import storage
from e2e_llm.batch import LORA_MARKER, Adapter, adapter_sha256, lora_adapter_name, lora_source, upload


@pytest.fixture
def adapter(tmp_path) -> Adapter:
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"\1" * 512)
    (path / "tokenizer.json").write_text("{}")  # not part of the adapter's identity: not uploaded
    return Adapter(path=path, sha256=adapter_sha256(path), rank=8, base_model="smollm2-135m")


def test_local_storage_names_the_adapter_by_its_folder_and_uploads_nothing(config, adapter):
    lora = lora_source(config, adapter)
    assert (lora.name, lora.source, lora.loading_path, lora.uploaded) == (str(adapter.path), str(adapter.path),
                                                                          None, False)
    assert not storage.exists(config.storage_uri("lora"))


def test_remote_storage_uploads_the_adapter_once_under_a_content_addressed_name(s3_config, adapter, monkeypatch):
    lora = lora_source(s3_config, adapter)
    name = f"smollm2-135m-lora-{adapter.sha256[:16]}"
    assert lora_adapter_name(s3_config, adapter) == name
    parent = s3_config.storage_uri("lora")
    assert (lora.name, lora.loading_path, lora.source, lora.uploaded) == (name, parent, f"{parent}/{name}", True)
    assert "/" not in lora.name and "://" not in lora.name  # Ray refuses a remote path as a row's model
    assert storage.list_dir(lora.source) == sorted(["adapter_config.json", "adapter_model.safetensors", "hash",
                                                    LORA_MARKER])
    assert storage.read_text(storage.join(lora.source, "hash")).strip() == adapter.sha256
    assert storage.read_bytes(storage.join(lora.source, "adapter_model.safetensors")) == b"\1" * 512

    # Second run (any driver): the marker is there, nothing is uploaded.
    monkeypatch.setattr(upload, "upload_once", lambda *a, **k: pytest.fail("uploaded again"))
    again = lora_source(s3_config, adapter)
    assert (again.name, again.source, again.uploaded) == (name, lora.source, False)


def test_an_adapter_upload_without_its_marker_is_done_again(s3_config, adapter):
    uri = storage.join(s3_config.storage_uri("lora"), lora_adapter_name(s3_config, adapter))
    storage.write_text(storage.join(uri, "adapter_config.json"), "partial")
    assert lora_source(s3_config, adapter).uploaded is True
    assert json.loads(storage.read_text(storage.join(uri, "adapter_config.json"))) == {"r": 8}
    assert storage.exists(storage.join(uri, LORA_MARKER))


def test_another_adapter_gets_another_name(s3_config, adapter):
    (adapter.path / "adapter_model.safetensors").write_bytes(b"\2" * 512)
    other = Adapter(path=adapter.path, sha256=adapter_sha256(adapter.path), rank=8, base_model=None)
    assert lora_adapter_name(s3_config, other) != lora_adapter_name(s3_config, adapter)


def test_processor_config_sets_the_loading_path_and_endpoint_for_a_remote_adapter(config, monkeypatch):
    pytest.importorskip("ray.data.llm")
    from e2e_llm.batch import processor_config

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    adapter = Adapter(path=None, sha256="ab" * 32, rank=8, base_model=None)
    remote = processor_config(config, "/models/base", adapter, "lora", "s3://b/viggo/lora")
    assert remote.dynamic_lora_loading_path == "s3://b/viggo/lora"
    assert remote.runtime_env["env_vars"]["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1234"
    local = processor_config(config, "/models/base", adapter, "lora")
    assert local.dynamic_lora_loading_path is None
    assert not any(k.startswith("AWS_") for k in local.runtime_env["env_vars"])
