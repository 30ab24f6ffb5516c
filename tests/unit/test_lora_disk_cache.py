# SPDX-License-Identifier: Apache-2.0
"""A serving machine's adapter downloads stay bounded (e2e_llm.lora_disk_cache), and an adapter
whose folder was pruned is downloaded again before the engine reads it (PrunedLoraLoader)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest

from e2e_llm.lora_disk_cache import is_complete, limits_from_settings, prune
from e2e_llm.lru_folders import ASIDE


def _lock(folder: str) -> str:
    return folder + ".lock"


def _adapters(root: Path, names: list[str], idle_s: list[float]) -> None:
    """Adapter folders used ``idle_s`` seconds ago (Ray's layout: one folder each, files inside)."""
    now = time.time()
    for name, idle in zip(names, idle_s, strict=True):
        folder = root / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(b"w")
        os.utime(folder, (now - idle, now - idle))


def test_the_least_recently_used_beyond_the_limit_are_removed(tmp_path):
    _adapters(tmp_path, ["v1", "v2", "v3", "v4", "v5"], [500, 400, 300, 200, 100])
    (tmp_path / "v1.lock").write_text("")  # Ray's lock files are files beside the folders
    assert sorted(prune(str(tmp_path), max_versions=2, min_idle_s=0, lock_path=_lock)) == ["v1", "v2", "v3"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["v4", "v5"]
    assert prune(str(tmp_path), max_versions=2, min_idle_s=0, lock_path=_lock) == []


def test_a_folder_used_lately_or_being_downloaded_into_stays(tmp_path):
    from filelock import FileLock

    _adapters(tmp_path, ["old", "recent", "downloading", "newest"], [900, 30, 900, 1])
    with FileLock(_lock(str(tmp_path / "downloading"))):  # another replica's download holds it
        removed = prune(str(tmp_path), max_versions=1, min_idle_s=60, lock_path=_lock)
    assert removed == ["old"]
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"recent", "downloading", "newest"}
    assert is_complete(str(tmp_path / "downloading"))


def test_a_removal_cut_off_by_a_crash_is_finished_and_no_half_folder_keeps_a_name(tmp_path):
    _adapters(tmp_path, ["v1"], [0])
    (tmp_path / f"{ASIDE}v0-1234").mkdir()
    assert prune(str(tmp_path), max_versions=1, min_idle_s=0, lock_path=_lock) == []
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]
    assert prune(str(tmp_path / "missing"), max_versions=1, min_idle_s=0, lock_path=_lock) == []


def test_the_profiles_limits_reach_the_replica_and_other_apps_keep_rays_loader():
    from e2e_llm.config import AdapterCache
    from e2e_llm.lora_disk_cache import adapter_cache_settings

    settings = adapter_cache_settings(AdapterCache(max_versions=3, min_idle_s=5))
    assert limits_from_settings({"stream_batching_interval_ms": 50, **settings}) == {"max_versions": 3,
                                                                                     "min_idle_s": 5}
    assert limits_from_settings(None) is None and limits_from_settings({"stream_batching_interval_ms": 50}) is None


@pytest.mark.serve
def test_a_pruned_adapter_is_downloaded_again_before_the_engine_reads_it(tmp_path, s3_server, local_model):
    """Ray's real loader against the loopback S3 store: three versions, room for one. vLLM keeps
    the folder path of each adapter it loaded and reloads from it after its own cache evicted it,
    so a request for a pruned version must find its files there again."""
    import boto3
    from adapters import make_lora_adapter
    from ray.llm._internal.common.utils.cloud_utils import LoraMirrorConfig

    from e2e_llm import storage
    from e2e_llm.compat.ray_serve import PrunedLoraLoader

    adapter = make_lora_adapter(local_model, tmp_path / "adapter")
    bucket = f"lc-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    for version in ("v1", "v2", "v3"):
        for file in adapter.iterdir():
            storage.write_bytes(f"s3://{bucket}/adapters/{version}/{file.name}", file.read_bytes())
    root = tmp_path / "cache"
    loader = PrunedLoraLoader(lora_root=str(root), max_versions=1, min_idle_s=0)

    async def load(version: str):
        mirror = LoraMirrorConfig(lora_model_id=f"base:{version}", bucket_uri=f"s3://{bucket}/adapters/{version}",
                                  max_total_tokens=None)
        await loader.ensure_on_disk(mirror.lora_model_id)  # as each request does first
        return await loader.load_model(mirror.lora_model_id, mirror)

    async def scenario():
        first = await load("v1")
        assert is_complete(first.local_path)
        await load("v2")
        third = await load("v3")
        on_disk = sorted(p.name for p in root.iterdir() if p.is_dir())
        assert on_disk == [Path(third.local_path).name]  # one version kept: the one just used
        assert not os.path.exists(first.local_path)
        again = await load("v1")  # Ray's own cache still names the pruned folder
        assert again.local_path == first.local_path and is_complete(first.local_path)
        assert [p.name for p in root.iterdir() if p.is_dir()] == [Path(first.local_path).name]  # still one

    asyncio.run(scenario())
