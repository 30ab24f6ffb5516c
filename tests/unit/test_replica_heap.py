# SPDX-License-Identifier: Apache-2.0
"""Serving replicas freeze their startup heap out of the garbage collector, as vLLM's own server
does; anything else that constructs the classes keeps its collector as it is."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve.llm")

from ray import serve  # noqa: E402
from serve_fakes import make_api  # noqa: E402

from e2e_llm import ingress, server  # noqa: E402
from e2e_llm.replica_heap import freeze_startup_heap  # noqa: E402


class Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's heap back under the collector


def test_outside_a_replica_nothing_is_frozen(unfrozen):
    assert freeze_startup_heap() is None
    assert gc.get_freeze_count() == 0


def test_in_a_replica_garbage_is_collected_first_then_everything_alive_is_frozen(unfrozen, monkeypatch):
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(replica_tag="r1"))
    garbage = Cycle()
    gone = weakref.ref(garbage)
    del garbage
    alive = Cycle()
    frozen = freeze_startup_heap()
    assert gone() is None  # a cycle only the collector frees was freed before the freeze
    # The interpreter's and the libraries' objects. A frozen object that dies leaves the permanent
    # generation (another thread of the test process may drop a few), and nothing else joins it.
    assert frozen >= gc.get_freeze_count() > 1000
    assert not any(obj is alive for obj in gc.get_objects())  # frozen: in no generation the collector walks
    gc.unfreeze()
    assert any(obj is alive for obj in gc.get_objects())


def test_the_engine_replica_freezes_once_its_engine_is_up(monkeypatch):
    from test_compat_ray_serve import _constructed_loader_roots

    calls = []
    settled: list = []
    monkeypatch.setattr(server, "freeze_startup_heap", lambda: calls.append(len(settled)))
    monkeypatch.setattr(server, "settle_off_engine_workers", lambda: settled.append("settled"))
    _constructed_loader_roots(monkeypatch, server.E2ELLMServer, "s3://b/adapters")
    assert calls == [1]  # once, after LLMServer's __init__ and the CPU settling


def test_the_ingress_replica_freezes_once_constructed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ingress, "freeze_startup_heap", lambda: calls.append("frozen"))
    api = make_api(tmp_path, monkeypatch)
    assert calls == ["frozen"] and api.ingress._store is not None
