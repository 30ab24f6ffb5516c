# SPDX-License-Identifier: Apache-2.0
"""A base model kept in object storage is copied to the machine that loads it (e2e_llm.model_mirror):
once per version of its files, named as the URI's last part, the tokenizer alone where that is
all a process needs. A loopback S3 server holds a fake checkpoint here: nothing is loaded."""

from __future__ import annotations

import tempfile
import uuid

import pytest

from e2e_llm import storage
from e2e_llm.model_mirror import ModelMirrorError, loadable, local_copy

CHECKPOINT = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "chat_template.jinja": b"{{x}}",
              "model-00001-of-00002.safetensors": b"\0" * 512, "model-00002-of-00002.safetensors": b"\1" * 512,
              "model.safetensors.index.json": b"{}", "sub/tokenizer.model": b"spm", "training_args.bin": b"\2"}


@pytest.fixture
def machine_temp(tmp_path, monkeypatch):
    """This machine's temp dir (where the copies go) inside the test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def uri(s3_server):
    """A fake checkpoint in the loopback S3 store, under a folder named as a model."""
    storage.filesystem("s3://e2e-models")[0].create_dir("e2e-models")
    base = f"s3://e2e-models/{uuid.uuid4().hex[:8]}/qwen2.5-7b-instruct"
    for name, data in CHECKPOINT.items():
        storage.write_bytes(storage.join(base, name), data)
    return base


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_copy_holds_every_file_and_is_named_as_the_uri(uri, machine_temp):
    copy = local_copy(uri, {})
    assert copy.name == "qwen2.5-7b-instruct" and copy.is_relative_to(machine_temp)
    assert _files(copy) == CHECKPOINT


def test_without_weights_the_copy_holds_what_a_tokenizer_and_config_need(uri, machine_temp):
    copy = local_copy(uri, {}, weights=False)
    assert set(_files(copy)) == {"config.json", "tokenizer.json", "chat_template.jinja",
                                 "model.safetensors.index.json", "sub/tokenizer.model"}
    assert local_copy(uri, {}) != copy  # the full copy is another folder: one never stands for the other


def test_a_copy_is_made_once_per_version_of_the_files(uri, machine_temp, monkeypatch):
    first = local_copy(uri, {})
    download = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda *a, **k: pytest.fail("downloaded again"))
    assert local_copy(uri, {}) == first

    storage.write_bytes(storage.join(uri, "tokenizer.json"), b'{"v": 2}')  # the mirror updated
    monkeypatch.setattr(storage, "download_dir", download)
    second = local_copy(uri, {})
    assert second != first and (second / "tokenizer.json").read_bytes() == b'{"v": 2}'
    assert not first.exists()  # the older version of this URI is gone from the machine's disk


def test_a_uri_without_a_checkpoint_is_named_and_leaves_nothing(uri, machine_temp):
    empty = f"s3://e2e-models/{uuid.uuid4().hex[:8]}/no-model"
    with pytest.raises(ModelMirrorError, match=rf"{empty}: no config.json there"):
        local_copy(empty, {})
    leftovers = [p for p in (machine_temp).rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert leftovers == []


def test_only_object_store_uris_are_copied(machine_temp, tmp_path):
    assert loadable(str(tmp_path), {}) == str(tmp_path)
    assert loadable("Qwen/Qwen2.5-7B-Instruct", {}) == "Qwen/Qwen2.5-7B-Instruct"  # a hub id: transformers fetches it


def test_the_store_settings_are_the_profiles_whatever_its_storage_root(local_config):
    """A model in S3 beside a local storage root is read with storage.endpoint_url and region."""
    assert local_config.storage_kw() == {}
    assert local_config.object_store_kw() == {"endpoint_url": local_config.storage.endpoint_url,
                                                   "region": local_config.storage.region}
