# SPDX-License-Identifier: Apache-2.0
"""What the ingress routes by: the adapter store's alias records, adapter folders and newest
version per name, read together and reused for a while (no store round trip per request).

A snapshot is as old as the *start* of its read: what was published while a read ran may be
missing from it. Two ways to ask for a fresh enough one:

- :meth:`StoreSnapshot.refresh` (``max_age``): for routing and listings, where a view a few
  seconds old is the contract (aliases follow the canary controller within ``alias_refresh_s``).
- :meth:`StoreSnapshot.look_again`: before saying "no such adapter". Any snapshot but a new one
  can predate a version published a moment before the client asked (a canary's preflight right
  after the publish), so a miss is only final once a read begun after the request came in
  misses it too. Those reads begin at least :data:`MISS_READ_INTERVAL_S`
  apart and requests waiting meanwhile share the next one, so a flood of unknown names costs
  the store a few reads a second, and a store that is down is not asked once per waiting request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from e2e_llm.store import AdapterStore, Alias

logger = logging.getLogger("ray.serve")

MISS_READ_INTERVAL_S = 0.25
NEVER = float("-inf")


class StoreUnreachable(RuntimeError):
    """No snapshot could ever be read: nothing to route by."""


class StoreSnapshot:
    def __init__(self, store: AdapterStore, on_read_error: Callable[[], None] | None = None):
        self.store = store
        self.aliases: dict[str, Alias] = {}
        self.adapters: set[str] = set()
        self.latest: dict[str, str] = {}  # adapter name ("" = any) -> its newest version present
        self.error: str | None = None  # why the last read failed; None once one succeeds
        self.loaded_at = NEVER  # start of the read the snapshot came from
        self._tried_at = NEVER  # start of the last read, whatever came of it
        self._on_read_error = on_read_error
        self._lock = asyncio.Lock()

    def age(self) -> float:
        return time.monotonic() - self.loaded_at

    async def refresh(self, max_age: float) -> None:
        """Re-read unless the snapshot is at most ``max_age`` seconds old. A failed read keeps
        the last good snapshot (``error`` says why); with none at all, :class:`StoreUnreachable`."""
        if self.age() <= max_age:
            return
        async with self._lock:
            if self.age() <= max_age:
                return
            await self._read()
            if self.loaded_at == NEVER:
                raise StoreUnreachable(self.error)

    async def look_again(self, asked_at: float) -> None:
        """The snapshot lacks what a request that came in at ``asked_at`` (``time.monotonic()``)
        names: make sure a read began since. If it failed, ``error`` says why, and "not
        published" cannot be told from "store down"."""
        async with self._lock:
            if self._tried_at >= asked_at:
                return
            wait = self._tried_at + MISS_READ_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._read()

    async def _read(self) -> None:
        started = self._tried_at = time.monotonic()
        try:
            self.aliases, self.adapters, self.latest = await asyncio.to_thread(self._read_store)
        except Exception as exc:  # noqa: BLE001  keep serving with the last good snapshot
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning("e2e-llm: reading the adapter store %s failed: %s", self.store.uri, exc)
            if self._on_read_error is not None:
                self._on_read_error()
            return
        self.loaded_at, self.error = started, None

    def _read_store(self) -> tuple[dict[str, Alias], set[str], dict[str, str]]:
        # Aliases first: an alias record names versions published before it was written, so
        # every version it names is in the folder listing read after it (unless removed since).
        aliases = self.store.aliases()
        adapters = set(self.store.adapter_ids())
        latest: dict[str, str] = {}
        for row in self.store.versions():
            if row["id"] in adapters:
                latest[row["name"]] = row["id"]
                latest[""] = row["id"]
        return aliases, adapters, latest
