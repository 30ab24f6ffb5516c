# SPDX-License-Identifier: Apache-2.0
"""The adapter store on a real S3-compatible server (moto on loopback): layout Ray Serve LLM
loads from, versions index, aliases, and the resolution rule batch and serve share."""

import json
import os
import uuid
from pathlib import Path

import pytest

from e2e_llm import storage
from e2e_llm.store import AdapterStore, Alias, StoreError


def fake_adapter(path: Path, rank: int = 8) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": "base"}))
    (path / "adapter_model.safetensors").write_bytes(os.urandom(64))
    return path


@pytest.fixture
def store(s3_server):
    return AdapterStore(f"s3://store-{uuid.uuid4().hex[:8]}/adapters")


def test_publish_writes_ray_layout_and_indexes_versions(store, tmp_path):
    src = fake_adapter(tmp_path / "a")
    first = store.publish(src, name="viggo", manifest={"run_id": "r1", "base_model": {"id": "smollm2-135m"}})
    second = store.publish(src, name="viggo")
    assert (first, second) == ("viggo-v1", "viggo-v2")
    # one folder per adapter (what Ray lists as <base>:<id>), JSON records beside them
    assert store.adapter_ids() == ["viggo-v1", "viggo-v2"]
    assert storage.list_dir(store.uri) == ["index.json", "viggo-v1", "viggo-v2"]
    files = storage.list_dir(store.adapter_uri("viggo-v1"))
    assert files == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    manifest = store.manifest("viggo-v1")
    assert manifest["run_id"] == "r1" and manifest["published"]["adapter_id"] == "viggo-v1"
    row = store.versions("viggo")[0]
    assert row["rank"] == 8 and row["base_model"] == "smollm2-135m" and row["run_id"] == "r1"
    assert store.latest("viggo") == "viggo-v2" and store.latest() == "viggo-v2"


def test_resolve_ids_latest_and_aliases_the_same_way(store, tmp_path):
    src = fake_adapter(tmp_path / "a")
    store.publish(src, name="viggo", alias="viggo")
    store.publish(src, name="viggo", version="exp")
    assert store.resolve("viggo") == "viggo-v1"  # alias -> stable
    assert store.resolve("latest") == "viggo-exp" and store.resolve("viggo:latest") == "viggo-exp"
    assert store.resolve("viggo-exp") == "viggo-exp"
    with pytest.raises(StoreError, match="unknown adapter 'nope'.*published.*aliases"):
        store.resolve("nope")


def test_alias_weights_pick_and_revisions(store, tmp_path):
    src = fake_adapter(tmp_path / "a")
    store.publish(src, name="viggo", alias="viggo")
    store.publish(src, name="viggo")
    record = store.set_alias("viggo", stable="viggo-v1", candidate="viggo-v2", candidate_weight=0.25)
    assert record.revision == 2
    assert store.aliases()["viggo"] == Alias.from_record("viggo", record.to_dict(), "written")
    assert record.pick(0.1) == "viggo-v2" and record.pick(0.3) == "viggo-v1"
    # publishing with --alias moves stable and keeps the running canary split
    store.publish(src, name="viggo", alias="viggo")
    moved = store.aliases()["viggo"]
    assert (moved.stable, moved.candidate, moved.candidate_weight, moved.revision) == ("viggo-v3", "viggo-v2", 0.25, 3)


def _store_alias_record(store, alias: str, record: dict) -> None:
    """Write ``aliases.json`` as another e2e-llm version would."""
    storage.write_text(storage.join(store.uri, "aliases.json"), json.dumps({alias: record}), **store.storage_kw)


def test_an_alias_written_by_a_newer_version_routes_and_is_rewritten_without_what_it_adds(store, tmp_path):
    # A rolling upgrade: the upgraded canary controller writes a field the still-serving older
    # ingress does not know. Reading it must not take every alias offline.
    src = fake_adapter(tmp_path / "a")
    store.publish(src, name="viggo")
    store.publish(src, name="viggo")
    newer = {"stable": "viggo-v1", "candidate": "viggo-v2", "candidate_weight": 0.5, "revision": 4,
             "updated_at": 1.0, "shadow": "viggo-v2", "shadow_weight": 0.1}
    _store_alias_record(store, "viggo", newer)
    with pytest.warns(UserWarning, match=r"alias 'viggo' has fields .*\(shadow, shadow_weight\).*newer version"):
        alias = store.aliases()["viggo"]
        assert store.resolve("viggo") == "viggo-v1"
    assert (alias.stable, alias.candidate, alias.candidate_weight, alias.revision) == ("viggo-v1", "viggo-v2", 0.5, 4)
    assert alias.pick(0.4) == "viggo-v2"
    assert alias.to_dict() == newer  # shown as stored
    # a change by this version keeps the revision order and says what it dropped
    with pytest.warns(UserWarning, match="newer version"):
        changed = store.set_alias("viggo", stable="viggo-v2")
    assert changed.revision == 5 and changed.unknown == {}
    stored = json.loads(storage.read_text(storage.join(store.uri, "aliases.json"), **store.storage_kw))
    assert set(stored["viggo"]) == {"stable", "candidate", "candidate_weight", "revision", "updated_at"}
    last = store.alias_history("viggo")[-1]
    assert last["dropped_fields"] == ["shadow", "shadow_weight"] and last["previous"] == newer


@pytest.mark.parametrize("record, message", [
    ({"candidate": "viggo-v1"}, "missing 1 required positional argument: 'stable'"),
    (["viggo-v1"], r"is not a record: \['viggo-v1'\]"),
])
def test_an_alias_record_it_cannot_route_by_names_the_file_and_alias(store, tmp_path, record, message):
    store.publish(fake_adapter(tmp_path / "a"), name="viggo")
    _store_alias_record(store, "viggo", record)
    with pytest.raises(StoreError, match=rf"aliases\.json: alias 'viggo'.*{message}"):
        store.aliases()


@pytest.mark.parametrize("kwargs, message", [
    ({"stable": "viggo-v9"}, "stable 'viggo-v9' is not a published adapter"),
    ({"stable": "viggo-v1", "candidate": "viggo-v1", "candidate_weight": 1.5},
     r"candidate_weight 1.5 is not in \[0, 1\]"),
    ({"stable": "viggo-v1", "candidate_weight": 0.5}, "without a candidate"),
])
def test_bad_alias_updates_are_rejected(store, tmp_path, kwargs, message):
    store.publish(fake_adapter(tmp_path / "a"), name="viggo")
    with pytest.raises(StoreError, match=message):
        store.set_alias("viggo", **kwargs)
    assert store.aliases() == {}


def test_bad_publishes_are_rejected_with_the_reason(store, tmp_path):
    with pytest.raises(StoreError, match="missing adapter_model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text("{}")
        store.publish(tmp_path / "empty", name="viggo")
    with pytest.raises(StoreError, match="rank 16 exceeds the serving max_lora_rank 8"):
        store.publish(fake_adapter(tmp_path / "r16", rank=16), name="viggo", max_rank=8)
    store.publish(fake_adapter(tmp_path / "ok"), name="viggo", version="v1")
    with pytest.raises(StoreError, match="viggo-v1 is already published"):
        store.publish(tmp_path / "ok", name="viggo", version="v1")
    with pytest.raises(StoreError, match="no ':' or '/'"):
        store.publish(tmp_path / "ok", name="base:viggo")
    assert store.adapter_ids() == ["viggo-v1"]
