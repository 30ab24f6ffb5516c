# SPDX-License-Identifier: Apache-2.0
"""The engine replica: Ray Serve LLM's ``LLMServer`` with one fix for dynamic LoRA loading.

In Ray 2.60 two concurrent first requests for an adapter a replica has not loaded yet both
ask vLLM to load it; the second fails ("has already been loaded") and the client gets a
500. That is exactly what a canary's first traffic to a new version looks like, so loading
is serialised per adapter here: the first request loads, the others wait and then find it
loaded. Used through ``LLMConfig.server_cls`` (``e2e_llm.serve.app_args``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from ray import serve
from ray.llm._internal.serve.core.server.llm_server import LLMServer


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
