# SPDX-License-Identifier: Apache-2.0
"""What a training worker reads from its machine's work dir: made once per machine however many
workers share it, never half-made, and no checkpoint but Ray Train's own is resumed from."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import uuid
from pathlib import Path

import pytest

from e2e_llm import storage
from e2e_llm.node_temp import fill_once
from e2e_llm.train_worker import RESUME_DIR, clear_earlier_attempts, local_dataset, restore_checkpoint

CONTENT = b"row\n" * 2000


def _slow_fill(tmp: Path, log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(tmp / "train.jsonl", "wb") as f:
        for start in range(0, len(CONTENT), 1000):  # written in pieces, as a download is
            f.write(CONTENT[start:start + 1000])
            f.flush()
            time.sleep(0.005)


def _worker(folder: str, log: str, start, seen: str) -> None:
    start.wait()
    target = fill_once(Path(folder), "v1", lambda tmp: _slow_fill(tmp, Path(log)))
    with open(seen, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "size": len((target / "train.jsonl").read_bytes())}) + "\n")


def test_workers_of_one_machine_fill_a_folder_once_and_all_read_it_whole(tmp_path):
    context = multiprocessing.get_context("fork")
    start = context.Barrier(4)
    folder, log, seen = tmp_path / "work" / "dataset", tmp_path / "fills.log", tmp_path / "seen.jsonl"
    procs = [context.Process(target=_worker, args=(str(folder), str(log), start, str(seen))) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert len(log.read_text().splitlines()) == 1  # one download for the machine
    sizes = [json.loads(line)["size"] for line in seen.read_text().splitlines()]
    assert sizes == [len(CONTENT)] * 4  # nobody read a file still being written
    assert sorted(p.name for p in folder.iterdir()) == ["v1"]  # no temporary folder left


def test_a_fill_that_fails_or_dies_leaves_nothing_taken_for_complete(tmp_path):
    folder = tmp_path / "dataset"

    def broken(tmp: Path) -> None:
        (tmp / "train.jsonl").write_bytes(CONTENT[:100])
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        fill_once(folder, "v1", broken)
    assert not (folder / "v1").exists()

    # A worker killed mid-download: its lock goes with it and its temporary folder stays behind.
    context = multiprocessing.get_context("fork")
    proc = context.Process(target=fill_once, args=(folder, "v1", lambda tmp: os._exit(9)))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 9
    assert [p.name for p in folder.iterdir() if p.name.startswith(".v1.")]

    target = fill_once(folder, "v1", lambda tmp: (tmp / "train.jsonl").write_bytes(CONTENT), timeout_s=10)
    assert (target / "train.jsonl").read_bytes() == CONTENT
    assert [p.name for p in folder.iterdir()] == ["v1"]


def test_a_new_version_replaces_the_old_one(tmp_path):
    folder = tmp_path / "dataset"
    fill_once(folder, "v1", lambda tmp: (tmp / "a").write_text("1"))
    assert fill_once(folder, "v1", lambda tmp: pytest.fail("filled twice")) == folder / "v1"
    fill_once(folder, "v2", lambda tmp: (tmp / "a").write_text("2"))
    assert [p.name for p in folder.iterdir()] == ["v2"]


def test_the_dataset_copy_follows_the_stored_files(tmp_path, s3_server):
    import boto3

    local = tmp_path / "store" / "data"
    local.mkdir(parents=True)
    work = tmp_path / "work"
    assert local_dataset(str(local), work, {}) == local  # a local dataset is read where it is

    bucket = f"ds-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/data/viggo"
    storage.write_bytes(f"{uri}/train.jsonl", b"a\n")
    first = local_dataset(uri, work, {})
    assert (first / "train.jsonl").read_bytes() == b"a\n"
    assert local_dataset(uri, work, {}) == first  # a restarted worker group downloads nothing
    storage.write_bytes(f"{uri}/train.jsonl", b"ab\n")  # ingested again
    second = local_dataset(uri, work, {})
    assert second != first and (second / "train.jsonl").read_bytes() == b"ab\n"
    assert not first.exists()


def test_tree_version_changes_with_any_file(tmp_path):
    (tmp_path / "a").write_text("x")
    before = storage.tree_version(str(tmp_path))
    assert storage.tree_version(str(tmp_path)) == before
    (tmp_path / "b").write_text("y")
    added = storage.tree_version(str(tmp_path))
    assert added != before
    os.utime(tmp_path / "a", ns=(1, 1))
    assert storage.tree_version(str(tmp_path)) != added


def _ray_checkpoint(tmp_path: Path, step: int):
    from ray.train import Checkpoint

    persisted = tmp_path / "runs" / "r1" / "checkpoint_2026-12-06_23-30-01.000001"
    persisted.mkdir(parents=True)
    (persisted / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (persisted / "adapter_model.safetensors").write_bytes(b"weights")
    (persisted / "rng_state_1.pth").write_bytes(b"rng of rank 1")
    return Checkpoint.from_directory(str(persisted))


def test_a_worker_resumes_from_ray_trains_checkpoint_not_what_its_node_holds(tmp_path):
    """On every node but rank 0's, the HF checkpoint folder of a step holds only that rank's RNG
    state: a worker restarted there used it as it was, and the Trainer found no checkpoint."""
    work = tmp_path / "work"
    leftover = work / "output" / "checkpoint-4"
    leftover.mkdir(parents=True)
    (leftover / "rng_state_1.pth").write_bytes(b"rng of rank 1")
    path, step = restore_checkpoint(_ray_checkpoint(tmp_path, 4), work)
    assert step == 4
    assert path.parent == work / RESUME_DIR
    assert sorted(p.name for p in path.iterdir()) == ["adapter_model.safetensors", "rng_state_1.pth",
                                                       "trainer_state.json"]


def test_a_checkpoint_in_object_storage_is_copied_without_rays_shared_lock_folder(tmp_path, s3_server, monkeypatch):
    """Ray's Checkpoint.as_directory locks a file in <temp dir>/_ray_lockfiles, which the machine's
    first Ray Train user owns: a second user's worker restarted from an S3 checkpoint failed there
    (PermissionError; reproduced as uid 1000 after root). The copy takes no lock of Ray's."""
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    local = _ray_checkpoint(tmp_path, 6).path
    s3 = storage.filesystem("s3://ckpt")[0]
    s3.create_dir("ckpt")
    storage.upload_dir(local, "s3://ckpt/runs/r1/checkpoint_2026-12-06_23-30-01.000001")
    assert isinstance(s3, pafs.S3FileSystem)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-temp"))  # where Ray's lock folder would be made
    remote = Checkpoint("ckpt/runs/r1/checkpoint_2026-12-06_23-30-01.000001", filesystem=s3)
    path, step = restore_checkpoint(remote, tmp_path / "work")
    assert step == 6
    assert {p.name: p.read_bytes() for p in path.iterdir()} == {p.name: p.read_bytes() for p in Path(local).iterdir()}
    assert not (tmp_path / "ray-temp" / "_ray_lockfiles").exists()


def test_earlier_attempts_cannot_be_taken_for_this_ones(tmp_path):
    output = tmp_path / "output"
    for name in ("checkpoint-2", "checkpoint-4", "runs"):
        (output / name).mkdir(parents=True)
    (output / "trainer_log.jsonl").write_text("{}\n")
    (output / "adapter_model.safetensors").write_bytes(b"final")
    clear_earlier_attempts(output, resuming=True)  # its log goes on; no checkpoint of its own is left
    assert sorted(p.name for p in output.iterdir()) == ["adapter_model.safetensors", "runs", "trainer_log.jsonl"]
    clear_earlier_attempts(output, resuming=False)  # from step 0: nothing of before
    assert list(output.iterdir()) == []
    clear_earlier_attempts(tmp_path / "missing", resuming=False)


def test_events_from_every_node_are_read_from_the_runs_storage(tmp_path, s3_server):
    """The driver runs on a cluster's head node, which sees no worker's disk: what the workers
    record goes to the run's storage, where the manifest and the resume hint read it."""
    import types
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from e2e_llm.train import resume_hint
    from e2e_llm.train_worker import append_event, read_events

    bucket = f"ev-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    run_uri = f"s3://{bucket}/runs/r1"
    plan = types.SimpleNamespace(run_id="r1", run_uri=run_uri, work_dir=str(tmp_path / "not-on-this-machine"))
    assert resume_hint(plan, {}) == "rerun with --run-id r1 to resume from the start (no checkpoint yet)"
    with ThreadPoolExecutor(4) as pool:  # four workers starting at once
        list(pool.map(lambda rank: append_event(run_uri, {}, event="start", rank=rank, world_size=4), range(4)))
    append_event(run_uri, {}, event="checkpoint", step=20, world_size=4)
    append_event(run_uri, {}, event="checkpoint", step=40, world_size=4)
    events = read_events(run_uri, {})
    assert sorted(e["rank"] for e in events if e["event"] == "start") == [0, 1, 2, 3]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [20, 40]
    assert resume_hint(plan, {}) == "rerun with --run-id r1 to resume from its last checkpoint (step 40)"
