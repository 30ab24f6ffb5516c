# SPDX-License-Identifier: Apache-2.0
"""The ingress's store snapshot (``e2e_llm.store_snapshot``): how fresh a view a request gets,
and what a flood of misses or a store outage costs the store."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import e2e_llm.store_snapshot as snapshot_module
from e2e_llm.store_snapshot import StoreSnapshot, StoreUnreachable


class FakeStore:
    """An adapter store whose reads take ``read_s`` and fail while ``down``; ``read_starts``: when each began."""

    uri = "s3://fake/adapters"

    def __init__(self, read_s: float = 0.0):
        self.ids = {"viggo-v1"}
        self.read_s, self.down = read_s, False
        self.read_starts: list[float] = []
        self._lock = threading.Lock()

    def aliases(self):
        with self._lock:
            self.read_starts.append(time.monotonic())
        time.sleep(self.read_s)
        if self.down:
            raise OSError("Connection refused (127.0.0.1:9)")
        return {}

    def adapter_ids(self):
        return sorted(self.ids)

    def versions(self):
        return [{"id": i, "name": i.rsplit("-", 1)[0]} for i in sorted(self.ids)]


def test_misses_arriving_together_share_one_read_each_begun_after_they_came_in():
    store = FakeStore(read_s=0.2)
    snapshot = StoreSnapshot(store)

    async def scenario():
        await snapshot.refresh(60)
        store.ids.add("late-v1")  # published after that read
        asked_at = time.monotonic()
        await asyncio.gather(*(snapshot.look_again(asked_at) for _ in range(20)))
        return asked_at

    asked_at = asyncio.run(scenario())
    assert len(store.read_starts) == 2 and store.read_starts[1] >= asked_at
    assert "late-v1" in snapshot.adapters and snapshot.latest["late"] == "late-v1"


THREAD_START_SLACK_S = 0.03


def test_reads_for_misses_begin_at_least_the_interval_apart(monkeypatch):
    monkeypatch.setattr(snapshot_module, "MISS_READ_INTERVAL_S", 0.1)
    store = FakeStore()
    snapshot = StoreSnapshot(store)

    async def scenario():
        for _ in range(4):  # each a new request, after the previous one's read
            await snapshot.look_again(time.monotonic())

    asyncio.run(scenario())
    gaps = [b - a for a, b in zip(store.read_starts, store.read_starts[1:])]
    # The snapshot spaces the reads it begins; the fake store sees each one in its worker thread, a
    # moment later, and on a loaded machine that moment varies (4.5 ms seen): allow for it. Reads
    # not spaced at all would be ~1 ms apart.
    assert len(store.read_starts) == 4 and min(gaps) >= 0.1 - THREAD_START_SLACK_S, gaps


def test_with_the_store_down_waiting_misses_share_the_failed_read_and_the_last_snapshot_stays():
    store = FakeStore(read_s=0.1)
    errors = []
    snapshot = StoreSnapshot(store, on_read_error=lambda: errors.append(1))

    async def scenario():
        await snapshot.refresh(60)
        store.down = True
        await asyncio.gather(*(snapshot.look_again(time.monotonic()) for _ in range(10)))

    asyncio.run(scenario())
    assert len(store.read_starts) == 2  # one read for all the waiting requests, not one each
    assert snapshot.error.startswith("OSError: Connection refused") and errors
    assert snapshot.adapters == {"viggo-v1"}  # the last good snapshot still routes
    store.down = False
    asyncio.run(snapshot.look_again(time.monotonic()))
    assert snapshot.error is None


def test_a_snapshot_is_as_old_as_the_start_of_its_read():
    store = FakeStore(read_s=0.3)
    snapshot = StoreSnapshot(store)
    asyncio.run(snapshot.refresh(60))
    assert snapshot.loaded_at <= store.read_starts[0] and snapshot.age() >= 0.3
    asyncio.run(snapshot.refresh(60))
    assert len(store.read_starts) == 1  # young enough to route by


def test_no_snapshot_ever_read_is_store_unreachable_naming_why():
    store = FakeStore()
    store.down = True
    snapshot = StoreSnapshot(store)
    with pytest.raises(StoreUnreachable, match="Connection refused"):
        asyncio.run(snapshot.refresh(60))
