# SPDX-License-Identifier: Apache-2.0
"""The engine replica: Ray Serve LLM's ``LLMServer`` with two changes, used through
``LLMConfig.server_cls`` (``e2e_llm.serve.app_args``).

- Dynamic LoRA loading is serialised per adapter. In Ray 2.60 two concurrent first requests
  for an adapter the replica has not loaded yet both ask vLLM to load it; the second fails
  ("has already been loaded") and its client gets a 500 -- exactly what a canary's first
  traffic to a new version looks like.
- Streams start unbatched. Ray groups streamed chunks every ``stream_batching_interval_ms``,
  including the first, so a long interval (cheaper on a small CPU box, see bench/RESULTS.md)
  would delay the first token by up to that interval. The first chunks (role, first token)
  go out at once; grouping starts after them.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncGenerator

from ray import serve
from ray.llm._internal.serve.core.server.llm_server import LLMServer
from ray.llm._internal.serve.utils.batcher import Batcher

# Chat streams open with a role-only chunk, then the first token.
UNBATCHED_HEAD = 2


class E2ELLMServer(LLMServer):
    _lora_locks: defaultdict[str, asyncio.Lock] | None = None

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return await super()._maybe_resolve_lora_from_multiplex()
        if self._lora_locks is None:
            self._lora_locks = defaultdict(asyncio.Lock)
        async with self._lora_locks[model_id]:
            return await super()._maybe_resolve_lora_from_multiplex()

    def _batch_output_stream(self, generator: AsyncGenerator) -> AsyncGenerator[list, None]:
        interval_ms = self._get_batch_interval_ms()

        async def stream():
            iterator = generator.__aiter__()
            for _ in range(UNBATCHED_HEAD):
                try:
                    yield [await iterator.__anext__()]
                except StopAsyncIteration:
                    return
            async for batch in Batcher(iterator, interval_ms=interval_ms).stream():
                yield batch

        return stream()
