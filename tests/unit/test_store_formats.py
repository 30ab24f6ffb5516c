# SPDX-License-Identifier: Apache-2.0
"""An adapter store written by an earlier release is read and extended by this one.

Upgrading e2e-llm (a GitOps rollout of a new image) keeps a team's store: its adapters, versions
index, aliases and alias history. ``stores/2026-12-02`` is what the 2026-12-02 release (89ce730,
the first with compare-and-swap writes and alias history) wrote for two publishes of ``viggo``
(the first with ``--alias viggo``) and a 25% canary split, as that release's ``AdapterStore``
wrote it. A change of the stored format that this release cannot read fails here."""

from __future__ import annotations

import asyncio
import uuid
import warnings
from pathlib import Path

import pytest

from e2e_llm import storage
from e2e_llm.store import AdapterStore
from e2e_llm.store_snapshot import StoreSnapshot

EARLIER = Path(__file__).parent / "stores" / "2026-12-02"


@pytest.fixture
def earlier_store(s3_server) -> AdapterStore:
    bucket = f"earlier-{uuid.uuid4().hex[:8]}"
    store = AdapterStore(f"s3://{bucket}/adapters")
    fs, _ = storage.filesystem(store.uri, **store.storage_kw)
    fs.create_dir(bucket)
    storage.upload_dir(EARLIER, store.uri, **store.storage_kw)
    return store


def test_a_store_an_earlier_release_wrote_routes_as_it_did(earlier_store):
    store = earlier_store
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every field of the earlier records is known
        alias = store.aliases()["viggo"]
        assert (alias.stable, alias.candidate, alias.candidate_weight, alias.revision) == \
            ("viggo-v1", "viggo-v2", 0.25, 2)
        assert store.adapter_ids() == ["viggo-v1", "viggo-v2"]
        assert store.resolve("viggo") == "viggo-v1" and store.latest("viggo") == "viggo-v2"
        assert [(row["id"], row["run_id"]) for row in store.versions("viggo")] == \
            [("viggo-v1", "old1"), ("viggo-v2", "old2")]
        assert store.manifest("viggo-v1")["base_model"] == {"id": "smollm2-135m"}
        snapshot = StoreSnapshot(store)  # what the ingress routes by
        asyncio.run(snapshot.refresh(0))
        assert snapshot.error is None and snapshot.adapters == {"viggo-v1", "viggo-v2"}
        assert snapshot.latest == {"viggo": "viggo-v2", "": "viggo-v2"}
        assert [entry["revision"] for entry in store.alias_history("viggo")] == [1, 2]


def test_this_release_publishes_and_moves_aliases_on_top_of_it(earlier_store, tmp_path):
    store = earlier_store
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "base_model_name_or_path": "base"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    assert store.publish(adapter, name="viggo", manifest={"run_id": "new3"}) == "viggo-v3"
    moved = store.set_alias("viggo", stable="viggo-v3", expected_revision=2)
    assert moved.revision == 3 and store.resolve("viggo") == "viggo-v3"
    history = store.alias_history("viggo")
    assert [entry["revision"] for entry in history] == [1, 2, 3]
    assert history[-1]["previous"]["stable"] == "viggo-v1"
