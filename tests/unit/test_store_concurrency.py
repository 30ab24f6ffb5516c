# SPDX-License-Identifier: Apache-2.0
"""No lost writes: many publishers and two canary controllers at once, as threads and as
processes, on the S3 server (moto on loopback) and on a local-path store.

Six ``publish(dir_i, name="race", alias="racer")`` calls started together must give six
distinct versions, each indexed exactly once, each folder holding exactly its own publisher's
files, and an alias history that is a chain with no lost step. Two controllers started together
on one alias: exactly one owns the rollout, the other gets a clear error and writes nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import pytest

from e2e_llm import storage
from e2e_llm.store import AdapterStore

ROOT = Path(__file__).resolve().parents[2]
N = 6


def make_adapter(path: Path, marker: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "base"}))
    (path / "adapter_model.safetensors").write_bytes(marker.encode() * 64)
    (path / "marker.txt").write_text(marker)
    return path


@pytest.fixture(params=["s3", "local"])
def store_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_server")
    return f"s3://race-{uuid.uuid4().hex[:8]}/adapters"


def run_together(target, args_list, mode: str) -> list:
    """Run ``target(*args, barrier)`` once per args, all released at the same moment, as threads
    or as processes; returns what each returned, in order."""
    if mode == "threads":
        barrier = threading.Barrier(len(args_list))
        results: list = [None] * len(args_list)

        def one(i, args):
            results[i] = target(*args, barrier)

        threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(args_list)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        return results
    # forkserver: the children fork from one clean process that imported the heavy modules once
    # (spawn re-imports them per child; fork would copy this process's threads' locks).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "e2e_llm.canary", "e2e_llm.canary_io", "e2e_llm.config", "boto3",
                                "botocore.client", "pyarrow.fs"])
    barrier, queue = ctx.Barrier(len(args_list)), ctx.Queue()
    procs = [ctx.Process(target=_in_process, args=(target, i, a, barrier, queue)) for i, a in enumerate(args_list)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return [got[i] for i in range(len(args_list))]


def _in_process(target, i, args, barrier, queue):
    queue.put((i, target(*args, barrier)))


# -- publishers ------------------------------------------------------------------------------


def publish_one(uri: str, adapter_dir: str, barrier) -> tuple[str, str]:
    store = AdapterStore(uri)
    barrier.wait()
    try:
        return ("ok", store.publish(adapter_dir, name="race", alias="racer"))
    except Exception as exc:  # noqa: BLE001  reported to the test
        return ("error", f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_six_publishers_at_once_get_six_versions_each_with_its_own_files(store_uri, tmp_path, mode):
    dirs = [str(make_adapter(tmp_path / f"adapter-{i}", f"publisher-{i}")) for i in range(N)]
    results = run_together(publish_one, [(store_uri, d) for d in dirs], mode)
    assert all(status == "ok" for status, _ in results), results
    ids = [adapter_id for _, adapter_id in results]
    assert sorted(ids) == [f"race-v{n}" for n in range(1, N + 1)]  # distinct, no gap

    store = AdapterStore(store_uri)
    index = store.index()
    assert sorted(index) == sorted(ids)  # each exactly once (a dict: once or not at all)
    assert sorted(v["seq"] for v in index.values()) == list(range(1, N + 1))
    assert sorted(store.adapter_ids()) == sorted(ids)
    for i, adapter_id in enumerate(ids):  # each folder holds exactly its publisher's files
        uri = store.adapter_uri(adapter_id)
        assert storage.list_dir(uri, **store.storage_kw) == ["adapter_config.json", "adapter_model.safetensors",
                                                             "manifest.json", "marker.txt"]
        assert storage.read_text(storage.join(uri, "marker.txt"), **store.storage_kw) == f"publisher-{i}"
        weights = storage.read_bytes(storage.join(uri, "adapter_model.safetensors"), **store.storage_kw)
        assert weights == f"publisher-{i}".encode() * 64
        assert store.manifest(adapter_id)["published"]["source"] == str(Path(dirs[i]).resolve())
        assert index[adapter_id]["source"] == str(Path(dirs[i]).resolve())

    history = store.alias_history("racer")
    assert [h["revision"] for h in history] == list(range(1, N + 1))  # no lost step
    assert history[0]["previous"] is None
    for before, after in zip(history, history[1:]):  # each change was made on top of the one before
        assert after["previous"] == before["record"]
    assert sorted(h["record"]["stable"] for h in history) == sorted(ids)
    final = store.aliases()["racer"]
    assert (final.revision, final.stable) == (N, history[-1]["record"]["stable"])


def test_an_explicit_version_is_claimed_by_one_publisher_only(store_uri, tmp_path):
    dirs = [str(make_adapter(tmp_path / f"adapter-{i}", f"publisher-{i}")) for i in range(3)]

    def publish_v1(uri, adapter_dir, barrier):
        barrier.wait()
        try:
            return ("ok", AdapterStore(uri).publish(adapter_dir, name="race", version="v1"))
        except Exception as exc:  # noqa: BLE001
            return ("error", str(exc))

    results = run_together(publish_v1, [(store_uri, d) for d in dirs], "threads")
    winners = [i for i, (status, _) in enumerate(results) if status == "ok"]
    assert len(winners) == 1, results
    assert all("race-v1 is already published (or being published)" in msg
               for status, msg in results if status == "error"), results
    store = AdapterStore(store_uri)
    assert list(store.index()) == ["race-v1"]
    marker = storage.read_text(storage.join(store.adapter_uri("race-v1"), "marker.txt"), **store.storage_kw)
    assert marker == f"publisher-{winners[0]}"


def test_a_stale_alias_update_is_refused_not_applied(store_uri, tmp_path):
    from e2e_llm.store import AliasConflict

    store = AdapterStore(store_uri)
    src = make_adapter(tmp_path / "a", "a")
    store.publish(src, name="race", alias="racer")
    store.publish(src, name="race")
    seen = store.aliases()["racer"].revision
    store.set_alias("racer", stable="race-v2", expected_revision=seen)  # revision 2
    with pytest.raises(AliasConflict, match="at revision 2, not 1"):
        store.set_alias("racer", stable="race-v1", expected_revision=seen)
    assert (store.aliases()["racer"].stable, store.aliases()["racer"].revision) == ("race-v2", 2)
    assert [h["revision"] for h in store.alias_history("racer")] == [1, 2]


# -- controllers ------------------------------------------------------------------------------


class SlowGoodProber:
    """Both versions answer every canary row with its reference, taking a moment (so the first
    controller is still mid-rollout when the second one looks)."""

    def probe(self, version, rows, policy, timeout_s):
        from e2e_llm.canary import Answer

        time.sleep(0.2)
        return [Answer(r["output"]) for r in rows]


class ReadyPreflight:
    """Every engine replica loaded the candidate and answered."""

    def check(self, version, row, deadline_s, max_tokens):
        from e2e_llm.canary import PreflightResult

        return PreflightResult(True, None, [{"replica": "engine-0", "ok": True, "reason": None, "latency_s": 0.1}])


class SteadyMetrics:
    """10 fast, successful requests per version between two scrapes."""

    def __init__(self):
        self.calls = 0

    def snapshot(self):
        from e2e_llm.canary import VersionStats

        self.calls += 1
        n = 10.0 * self.calls
        return {v: VersionStats(n, 0.0, {0.5: n, float("inf"): n}) for v in ("race-v1", "race-v2")}


def run_controller(uri: str, barrier) -> tuple[str, str, str]:
    from contextlib import suppress
    from threading import BrokenBarrierError

    from e2e_llm.canary import CanaryError, Controller, RolloutLog, load_canary_set, load_policy
    from e2e_llm.canary_io import StoreRouter, rollout_log_uri
    from e2e_llm.config import load_profile

    base = load_policy(ROOT / "configs/canary.yaml")
    policy = base.model_copy(update={
        "alias": "racer", "steps": [10, 50, 100], "step_window_s": 0.2,
        "quality": base.quality.model_copy(update={"max_rows": 4}),
        "slo": base.slo.model_copy(update={"min_requests": 1, "metrics_lag_s": 0.0}),
    })
    class MeetBeforeFirstAppend(RolloutLog):
        """Both controllers have read the (empty) log before either writes its start record: the
        worst interleaving, made certain. Only the compare-and-swap can then pick one."""

        met = False

        def append(self, record):
            if not self.met:
                self.met = True
                with suppress(BrokenBarrierError):  # broken: the other one was refused before writing
                    barrier.wait(timeout=10)
            super().append(record)

    store = AdapterStore(uri)
    controller = Controller(policy=policy, task=load_profile("local", root=ROOT).task_schema(),
                            canary_rows=load_canary_set(policy, ROOT),
                            log=MeetBeforeFirstAppend(rollout_log_uri(store, "racer"), store.storage_kw),
                            router=StoreRouter(store), prober=SlowGoodProber(), metrics=SteadyMetrics(),
                            out=lambda _: None, preflight=ReadyPreflight())
    barrier.wait()
    try:
        return ("ok", controller.me["id"], controller.run("race-v2").result)
    except CanaryError as exc:
        return ("refused", controller.me["id"], f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_two_controllers_on_one_alias_exactly_one_owns_the_rollout(store_uri, tmp_path, mode):
    from e2e_llm.canary import RolloutLog
    from e2e_llm.canary_io import rollout_log_uri

    store = AdapterStore(store_uri)
    src = make_adapter(tmp_path / "a", "a")
    store.publish(src, name="race", alias="racer")
    store.publish(src, name="race")
    results = run_together(run_controller, [(store_uri,), (store_uri,)], mode)
    winners = [r for r in results if r[0] == "ok"]
    losers = [r for r in results if r[0] == "refused"]
    assert len(winners) == 1 and len(losers) == 1, results
    assert winners[0][2] == "promoted"
    assert "ConcurrentRolloutError" in losers[0][2] and "changed under this controller" in losers[0][2], losers

    records = RolloutLog(rollout_log_uri(store, "racer"), store.storage_kw).read()
    assert [r["event"] for r in records].count("start") == 1
    assert {r["owner"]["id"] for r in records} == {winners[0][1]}  # the loser wrote nothing
    assert records[-1]["event"] == "promoted"
    history = store.alias_history("racer")
    assert [h["revision"] for h in history] == list(range(1, len(history) + 1))
    for before, after in zip(history, history[1:]):
        assert after["previous"] == before["record"]
    # published, then 10% -> 50% -> 100% -> promoted: each weight change once
    assert [h["record"]["candidate_weight"] for h in history] == [0.0, 0.1, 0.5, 1.0, 0.0]
    assert store.aliases()["racer"].stable == "race-v2"


def test_a_controller_stops_before_the_alias_when_the_log_changed_under_it(store_uri, tmp_path):
    """A manual rollback lands while a controller runs: before touching the alias the controller
    checks the log (``verify``) and stops."""
    from e2e_llm.canary import ConcurrentRolloutError, RolloutLog
    from e2e_llm.canary_io import rollout_log_uri

    store = AdapterStore(store_uri)
    src = make_adapter(tmp_path / "a", "a")
    store.publish(src, name="race", alias="racer")
    store.publish(src, name="race")
    log = RolloutLog(rollout_log_uri(store, "racer"), store.storage_kw)
    log.read()
    log.append({"event": "start"})
    other = RolloutLog(log.uri, store.storage_kw)
    other.read()
    other.append({"event": "rollback"})
    with pytest.raises(ConcurrentRolloutError, match="changed under this controller"):
        log.verify()
