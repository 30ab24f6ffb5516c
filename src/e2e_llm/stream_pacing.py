# SPDX-License-Identifier: Apache-2.0
"""How an engine replica groups a streamed response's chunks into messages.

Every message a stream sends crosses engine replica -> ingress -> proxy, and each hop costs CPU
per message, whatever it carries. On a small CPU box that cost competes with the engine, and it
grows with the number of open streams (bench/RESULTS.md, "serve_latency_vs_vllm"). So:

- The first chunks of a stream (``head``: the role chunk and the first token) go out at once:
  time to first token does not depend on the grouping. Chunks read together go in one message
  (vLLM yields a chat stream's role chunk and first token in one engine step: one message, not two).
- After that a stream sends at most one message per interval, as soon as the interval has
  passed and a chunk is waiting (never an empty message; the end of the stream is flushed at
  once).
- The interval is ``interval_ms``, lengthened when many streams are open on the replica so that
  all of them together send about ``messages_per_s`` messages a second (the interval is
  ``open streams / messages_per_s``), up to ``max_interval_ms``. Light load streams smoothly;
  under heavy load the per-message cost stays bounded and streams arrive in larger groups.

:class:`StreamPacer` is one per replica (it counts the open streams); :meth:`StreamPacer.batched`
wraps one stream. No Ray imports: the replica (``e2e_llm.compat.ray_serve.PatchedLLMServer``)
plugs it in.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from typing import Any

# The LLMConfig.experimental_configs keys (and serve.* profile settings) of the pacing besides
# Ray's own stream_batching_interval_ms; Ray ignores keys it does not know.
PACING_KEYS = ("stream_batching_max_interval_ms", "stream_batching_messages_per_s")


class StreamPacer:
    """The grouping interval of a replica's streams (see the module doc)."""

    def __init__(self, interval_ms: float, *, max_interval_ms: float | None = None,
                 messages_per_s: float | None = None, head: int = 2):
        if interval_ms < 0:
            raise ValueError(f"interval_ms must be >= 0, got {interval_ms}")
        if messages_per_s is not None and messages_per_s <= 0:
            raise ValueError(f"messages_per_s must be > 0, got {messages_per_s}")
        if max_interval_ms is not None and max_interval_ms < interval_ms:
            raise ValueError(f"max_interval_ms ({max_interval_ms}) must be >= interval_ms ({interval_ms})")
        self.interval_s = interval_ms / 1000
        self.max_interval_s = (max_interval_ms if max_interval_ms is not None else interval_ms) / 1000
        self.messages_per_s = messages_per_s
        self.head = head
        self.open = 0  # streams of this replica being sent now

    def current_interval_s(self) -> float:
        """The interval a stream waits between two messages now."""
        if not self.messages_per_s:
            return self.interval_s
        return min(self.max_interval_s, max(self.interval_s, self.open / self.messages_per_s))

    async def batched(self, chunks: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
        """``chunks`` as lists: the first ``head`` at once, then grouped (see the module doc); with
        an interval of 0, every chunk alone. An error from ``chunks`` is raised after the chunks
        read before it are sent."""
        iterator = chunks.__aiter__()
        self.open += 1
        try:
            if self.current_interval_s() == 0:
                async for chunk in iterator:
                    yield [chunk]
                return
            async with aclosing(_grouped(iterator, self.current_interval_s, self.head)) as groups:
                async for batch in groups:
                    yield batch
        finally:
            self.open -= 1


async def _grouped(iterator: AsyncIterator[Any], interval_s, head: int = 0) -> AsyncIterator[list[Any]]:
    """Chunks of ``iterator`` read by a background task, sent at most once per ``interval_s()``
    once ``head`` chunks have been sent; until then, as soon as they are read (with the chunks
    read in the same event-loop turn)."""
    sent = 0
    pending: list[Any] = []
    arrived = asyncio.Event()
    finished = asyncio.Event()

    async def read() -> None:
        try:
            async for chunk in iterator:
                pending.append(chunk)
                arrived.set()
        finally:
            finished.set()
            arrived.set()

    reader = asyncio.create_task(read())
    loop = asyncio.get_running_loop()
    try:
        last = loop.time()
        while True:
            wait = last + interval_s() - loop.time()
            if sent >= head and wait > 0 and not finished.is_set():
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(finished.wait(), wait)
            if not pending and not finished.is_set():
                arrived.clear()
                await arrived.wait()  # nothing yet: the next chunk goes out when it comes
                if sent < head:
                    await asyncio.sleep(0)  # one turn for a chunk produced in the same engine step
            if pending:
                batch = pending[:]
                pending.clear()
                last = loop.time()
                sent += len(batch)
                yield batch
            if finished.is_set() and not pending:
                reader.result()  # the stream's error, if any, after what it sent
                return
    finally:
        if not reader.done():
            reader.cancel()
