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

Both override private ``LLMServer`` methods, so they live in :mod:`e2e_llm.compat.ray_serve`
with their upstream references and the tests that catch a Ray upgrade changing them.
"""

from __future__ import annotations

from e2e_llm.compat.ray_serve import PatchedLLMServer


class E2ELLMServer(PatchedLLMServer):
    """The ``server_cls`` the rendered service configs name (``e2e_llm.server:E2ELLMServer``)."""
