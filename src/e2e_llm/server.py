# SPDX-License-Identifier: Apache-2.0
"""The engine replica: Ray Serve LLM's ``LLMServer`` with two changes, used through
``LLMConfig.server_cls`` (``e2e_llm.serve.app_args``).

- Dynamic LoRA loading is serialised per adapter. In Ray 2.60 two concurrent first requests
  for an adapter the replica has not loaded yet both ask vLLM to load it; the second fails
  ("has already been loaded") and its client gets a 500 -- exactly what a canary's first
  traffic to a new version looks like.
- An adapter that cannot be loaded because the adapter store is unreachable is a 503 naming
  the store and the reason, not Ray's 404 "Unable to find LoRA adapter config file" (other
  load failures, e.g. vLLM rejecting damaged weights, keep Ray's error). Ray
  caches that miss for ``CLOUD_OBJECT_MISSING_EXPIRE_S`` (30 s): for that long after the store
  is back the answer stays a 503 saying so, then the adapter loads without a restart.
- Streams start unbatched and are paced by load (``e2e_llm.stream_pacing``). Ray groups streamed
  chunks every ``stream_batching_interval_ms``, including the first, so a long interval (cheaper
  on a small CPU box, see bench/RESULTS.md) would delay the first token by up to that interval.
  The first chunks (role, first token) go out at once; grouping starts after them, and with
  ``stream_batching_messages_per_s`` set the interval grows with the replica's open streams (up to
  ``stream_batching_max_interval_ms``), so the per-message cost of the hops stays bounded.
- Adapters are downloaded into one folder per adapter store (``lora_cache_dir``, in the user's own
  temp folder), not Ray's one folder per machine, where two apps whose stores both hold a
  ``viggo-v1`` overwrite each other.
- Where ``serve.isolate_engine_cpus`` moved Ray's processes off the engine's CPUs
  (``e2e_llm.cpu_pinning``), a replica puts itself back on them before vLLM starts.
- Once up, the replica freezes its startup heap out of the garbage collector, as vLLM's own server
  does (``e2e_llm.replica_heap``).
- ``preflight(request, deadline_s)``: the replica's part of the ingress's ``POST /-/preflight``
  (``e2e_llm.serve_preflight``): load the adapter the request names and answer it once, within
  the deadline; the ingress calls it on every replica (``DeploymentHandle.broadcast``).

The first and third override private ``LLMServer`` methods, so they live in
:mod:`e2e_llm.compat.ray_serve` (``PatchedLLMServer``) with their upstream references and the
tests that catch a Ray upgrade changing them; the 503 is this class's ``adapter_load_failed``
hook, which that override calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

from ray import serve

from e2e_llm import storage
from e2e_llm.compat.ray_serve import OpenAIHTTPException, PatchedLLMServer
from e2e_llm.cpu_pinning import settle_off_engine_workers, widen_to_engine_cpus
from e2e_llm.node_temp import own_temp_dir
from e2e_llm.replica_heap import freeze_startup_heap
from e2e_llm.serve_preflight import answer_once, report

# Ray Serve LLM keeps "adapter config missing" this long (CLOUD_OBJECT_MISSING_EXPIRE_S).
RAY_MISSING_CACHE_S = 30


def store_problem(adapter_uri: str) -> str | None:
    """Why ``<adapter_uri>/adapter_config.json`` cannot be read (None: it can be, or it is
    simply not there -- a real 404)."""
    try:
        storage.read_bytes(storage.join(adapter_uri, "adapter_config.json"), endpoint_url=storage.s3_endpoint(),
                           region=os.environ.get("AWS_DEFAULT_REGION"))
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001  any other failure: the store is not answering
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return ""  # readable now: Ray's cached miss is stale


def lora_cache_dir(store_uri: str, endpoint: str | None) -> str:
    """Where replicas reading the adapter store ``store_uri`` (at S3 ``endpoint``) keep downloaded
    adapters: one folder per store, in this user's own temp folder (:func:`own_temp_dir`).
    Versions are immutable within a store (claimed once, see e2e_llm.publish), so replicas of one
    store may share a folder; another store's version of the same name (a second pipeline or test
    app on this machine) must not land in it."""
    key = hashlib.sha256(f"{endpoint or ''}|{store_uri.rstrip('/')}".encode()).hexdigest()[:16]
    return os.path.join(own_temp_dir(), "lora-cache", key)


class E2ELLMServer(PatchedLLMServer):
    """The ``server_cls`` the rendered service configs name (``e2e_llm.server:E2ELLMServer``)."""

    async def __init__(self, llm_config, **kwargs):
        # Back on the engine's CPUs before vLLM binds its worker: a replica Serve restarts is started
        # by a raylet that e2e_llm.cpu_pinning moved off them (no-op unless that is in use).
        widen_to_engine_cpus()
        await super().__init__(llm_config, **kwargs)
        # The engine is up and its workers bound: the rest of it off their CPUs (no-op as above).
        settle_off_engine_workers()
        freeze_startup_heap()

    def lora_cache_root(self, llm_config) -> str | None:
        if llm_config.lora_config is None:
            return None
        return lora_cache_dir(llm_config.lora_config.dynamic_lora_loading_path, storage.s3_endpoint())

    async def adapter_load_failed(self, model_id: str, exc: Exception) -> None:
        """A 503 naming the store when the adapter could not be loaded because the store is (or
        just was) unreachable; otherwise return and Ray's own error stands."""
        if self._llm_config.lora_config is None:
            return
        root = self._llm_config.lora_config.dynamic_lora_loading_path.rstrip("/")
        uri = f"{root}/{model_id.partition(':')[2]}"
        problem = await asyncio.to_thread(store_problem, uri)
        if problem is None or (not problem and getattr(exc, "status_code", None) != 404):
            # None: really not there. Readable now: only Ray's cached "config not found" (404) was the
            # store's fault; any other error (vLLM rejecting damaged weights) stands as it is.
            return
        if problem:
            message = (f"adapter {model_id!r} is not loaded on this replica and the adapter store is "
                       f"unreachable ({uri}: {problem}); retry once the store is back")
        else:
            message = (f"adapter {model_id!r} could not be loaded while the adapter store was unreachable; "
                       f"the store answers again, the adapter loads within {RAY_MISSING_CACHE_S} s: retry")
        raise OpenAIHTTPException(503, message, type="ServiceUnavailable") from exc

    async def preflight(self, request, deadline_s: float) -> dict:
        """This replica's preflight report for ``request`` (a non-streaming chat request for
        ``<base>:<adapter>``, sent with that adapter as the multiplexed model id): the adapter
        loaded and one answer came back within ``deadline_s``, or why not."""
        context = serve.get_replica_context()
        replica = f"{context.deployment}#{context.replica_tag}"
        if serve.get_multiplexed_model_id() != request.model:  # else vLLM would not load the adapter
            return report(replica, False, f"the preflight for {request.model!r} reached this replica without it as "
                                          f"the multiplexed model id ({serve.get_multiplexed_model_id()!r})", None)
        return await answer_once(self.chat, request, deadline_s, replica)
