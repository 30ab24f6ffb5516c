# SPDX-License-Identifier: Apache-2.0
"""Ray Serve LLM (Ray 2.60) beyond its public API: the names ``ray.serve.llm`` does not export,
the two ``LLMServer`` overrides that work around Ray 2.60 bugs, and the LoRA loader with a bounded
disk cache (``PrunedLoraLoader``).

Public names (``ray.serve.llm.LLMServer``, ``LLMConfig``, ``build_llm_deployment``,
``ray.serve.llm.ingress.OpenAiIngress`` / ``make_fastapi_ingress``,
``ray.serve.llm.openai_api_models.ChatCompletionRequest`` / ``CompletionRequest``) are imported
where they are used. Everything below is an :class:`~e2e_llm.compat.Entry`; after a Ray upgrade
run ``pytest tests/unit/test_compat_ray_serve.py``: it names each entry that moved or changed.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from ray.serve.llm import LLMServer

from e2e_llm.compat import Entry, problems, resolve
from e2e_llm.lora_disk_cache import is_complete, limits_from_settings, mark_used, prune
from e2e_llm.stream_pacing import PACING_KEYS, StreamPacer

_OPENAI_MODELS = "ray.llm._internal.serve.core.configs.openai_api_models"
_LORA_SERVE_UTILS = "ray.llm._internal.serve.utils.lora_serve_utils"
_INGRESS = "ray.llm._internal.serve.core.ingress.ingress"

DEFAULT_ENDPOINTS_ENTRY = Entry(
    _INGRESS, "DEFAULT_ENDPOINTS",
    why="make_fastapi_ingress(endpoint_map=...) replaces Ray's route map; we extend it with /v1/aliases")
INIT = Entry(
    _INGRESS, "init", params=(),
    why="the ingress FastAPI app with Ray's lifespan and error handlers, so our auth middleware can wrap it")
MODEL_CARD = Entry(_OPENAI_MODELS, "ModelCard", why="/v1/models lists aliases as model cards")
MODEL_LIST = Entry(_OPENAI_MODELS, "ModelList", why="the /v1/models response type")
OPENAI_HTTP_EXCEPTION = Entry(
    _OPENAI_MODELS, "OpenAIHTTPException",
    why="raised for an unreadable adapter store; Ray's ingress turns it into an OpenAI error body (503)")
TO_MODEL_METADATA = Entry(
    _OPENAI_MODELS, "to_model_metadata", params=("model_id", "model_config", "overrides"),
    why="the model cards our ingress is bound with (build_openai_app does it internally)")
DEPLOYMENT_DEFAULTS = Entry(
    "ray.llm._internal.common.dict_utils", "maybe_apply_llm_deployment_config_defaults",
    params=("defaults", "user_deployment_config"),
    why="merges ingress_deployment_config into Ray's ingress defaults, as build_openai_app does")
WORKER_NICENESS = Entry(
    "ray._private.ray_constants", "RAY_WORKER_NICENESS",
    why="the engine replica's runtime_env sets this Ray setting to 0 on CPU profiles so the engine runs "
        "at normal priority, not at Ray's worker niceness 15 (e2e_llm.serve.CPU_ENGINE_ENV)")
CONTROL_LOOP_INTERVAL = Entry(
    "ray.serve._private.constants", "CONTROL_LOOP_INTERVAL_S",
    why="serve.control_loop_interval_s sets the controller's RAY_SERVE_CONTROL_LOOP_INTERVAL_S (documented), "
        "which Ray reads into this constant (e2e_llm.serve.serve_start_kwargs)")
GRPC_BY_DEFAULT = Entry(
    "ray.serve._private.constants", "RAY_SERVE_USE_GRPC_BY_DEFAULT",
    why="Serve's high-throughput mode sends handle calls between replicas over gRPC, but a deployment handle "
        "keeps the transport of the process that built the app: a driver that imported Serve before the mode's "
        "environment was set (e2e-llm serve, the bench, the tests) gave the ingress Ray actor calls instead; "
        "the ingress re-reads the transport in its own process (with_mode_transport)")
LORA_LOADER = Entry(
    _LORA_SERVE_UTILS, "LoraModelLoader",
    params=("lora_root", "download_timeout_s", "max_tries"),
    why="every LLMServer on a machine downloads adapters into one folder (/tmp/ray/llm/lora/cache/<version>): "
        "two apps whose stores both hold a version of the same name overwrite each other's weights there; "
        "PatchedLLMServer gives the loader a folder of the subclass's choosing (lora_cache_root)")
LORA_LOAD_MODEL = Entry(
    _LORA_SERVE_UTILS, "LoraModelLoader.load_model", params=("self", "lora_model_id", "lora_mirror_config"),
    why="overridden: each adapter's folder and source are recorded, and the cache pruned after a download "
        "(Ray never removes a downloaded version: a long-running service filled its disk; e2e_llm.lora_disk_cache)")
LORA_DOWNLOAD = Entry(
    _LORA_SERVE_UTILS, "LoraModelLoader._download_lora", params=("self", "lora_mirror_config"),
    why="downloads a pruned adapter again into the folder Ray and vLLM keep its path of")
LORA_DOWNLOAD_LOCK = Entry(
    "ray.llm._internal.common.utils.lora_utils", "sync_files_with_lock",
    params=("bucket_uri", "local_path", "timeout", "substrings_to_include"),
    why="downloads into a folder under the lock '<folder>.lock' (filelock); pruning takes the same lock, so it "
        "never removes a folder being downloaded into (download_lock)")
SERVER_INIT = Entry(
    "ray.serve.llm", "LLMServer.__init__", params=("self", "llm_config", "engine_cls", "model_downloader"),
    why="the model_downloader argument is where the LoRA loader with our folder is injected")
# Private members of public classes that we override or call.
RESOLVE_LORA = Entry(
    "ray.serve.llm", "LLMServer._maybe_resolve_lora_from_multiplex", params=("self",),
    why="overridden: two concurrent first requests for an unloaded adapter both load it in vLLM and "
        "the second fails ('has already been loaded', HTTP 500); we serialise loads per adapter "
        "(no upstream issue found for this race)")
BATCH_OUTPUT_STREAM = Entry(
    "ray.serve.llm", "LLMServer._batch_output_stream", params=("self", "generator"),
    why="overridden: Ray batches the first streamed chunks too, delaying the first token by up to "
        "stream_batching_interval_ms; and its interval is fixed, while e2e_llm.stream_pacing lengthens it "
        "when many streams are open (fewer messages through replica -> ingress -> proxy)",
    upstream="https://github.com/ray-project/ray/pull/64534 (issue #59681)")
BATCH_INTERVAL = Entry(
    "ray.serve.llm", "LLMServer._get_batch_interval_ms", params=("self", "stream"),
    why="the stream override reads the configured interval the way Ray does")
PROCESS_REQUEST = Entry(
    "ray.serve.llm.ingress", "OpenAiIngress._process_llm_request", params=("self", "body", "call_method",
                                                                          "raw_request"),
    why="our chat/completions routes resolve aliases, then hand the request to Ray's routing")
# Node initialisation: a callback that skips the model download for a local folder.
_CALLBACKS = "ray.llm._internal.common.callbacks.base"
CALLBACK_BASE = Entry(
    _CALLBACKS, "CallbackBase", params=("llm_config", "raise_error_on_callback", "ctx_kwargs", "kwargs"),
    why="LLMConfig.callback_config (public) takes a subclass of this private class; LocalModelCallback "
        "skips the per-node model download task for a model in a local folder")
CALLBACK_HOOK = Entry(_CALLBACKS, "CallbackBase.on_before_node_init", params=("self",),
                      why="the hook LocalModelCallback overrides, called before the node initialisation")
CALLBACK_CTX = Entry(
    _CALLBACKS, "CallbackCtx",
    params=("worker_node_download_model", "placement_group", "runtime_env", "custom_data", "run_init_node"),
    why="run_init_node=False is how a callback skips the node initialisation (the model download task)")
# Also read, an instance attribute (checked by instantiating OpenAiIngress in the test):
# OpenAiIngress._model_cards, the base models the ingress serves (dict model id -> ModelCard).

ENTRIES = [DEFAULT_ENDPOINTS_ENTRY, INIT, MODEL_CARD, MODEL_LIST, OPENAI_HTTP_EXCEPTION,
           TO_MODEL_METADATA, DEPLOYMENT_DEFAULTS, RESOLVE_LORA, BATCH_OUTPUT_STREAM, BATCH_INTERVAL,
           PROCESS_REQUEST, WORKER_NICENESS, CONTROL_LOOP_INTERVAL, GRPC_BY_DEFAULT, LORA_LOADER, SERVER_INIT,
           CALLBACK_BASE, CALLBACK_HOOK, CALLBACK_CTX, LORA_LOAD_MODEL, LORA_DOWNLOAD, LORA_DOWNLOAD_LOCK]
OVERRIDES = [RESOLVE_LORA, BATCH_OUTPUT_STREAM, LORA_LOAD_MODEL]


def serve_constants_source() -> str:
    """The source of the module holding Serve's settings (to check the name of one it reads)."""
    import inspect
    import sys

    resolve(CONTROL_LOOP_INTERVAL, __name__)
    return inspect.getsource(sys.modules[CONTROL_LOOP_INTERVAL.module])


def mode_transport() -> str:
    """How Serve's mode says this process calls other replicas: ``"grpc"`` in the high-throughput
    mode, ``"ray"`` (Ray actor calls) otherwise (``GRPC_BY_DEFAULT``)."""
    return "grpc" if resolve(GRPC_BY_DEFAULT, __name__) else "ray"


def with_mode_transport(handle):
    """``handle`` calling its replicas by :func:`mode_transport`, so that a replica's calls do not
    depend on where or when the app was built, and local runs use the transport clusters use."""
    return handle.options(_by_reference=mode_transport() == "ray")


def check() -> list[str]:
    """Messages for every entry a Ray upgrade broke (empty: all fine)."""
    return problems(ENTRIES, __name__)


for _entry in (RESOLVE_LORA, BATCH_OUTPUT_STREAM, BATCH_INTERVAL, PROCESS_REQUEST, SERVER_INIT, CALLBACK_HOOK,
               CALLBACK_CTX, LORA_LOAD_MODEL, LORA_DOWNLOAD, LORA_DOWNLOAD_LOCK):
    resolve(_entry, __name__)  # fail at import, not silently at the first request
DEFAULT_ENDPOINTS = resolve(DEFAULT_ENDPOINTS_ENTRY, __name__)
fastapi_app = resolve(INIT, __name__)
ModelCard = resolve(MODEL_CARD, __name__)
ModelList = resolve(MODEL_LIST, __name__)
OpenAIHTTPException = resolve(OPENAI_HTTP_EXCEPTION, __name__)
to_model_metadata = resolve(TO_MODEL_METADATA, __name__)
apply_deployment_defaults = resolve(DEPLOYMENT_DEFAULTS, __name__)
LoraModelLoader = resolve(LORA_LOADER, __name__)
CallbackBase = resolve(CALLBACK_BASE, __name__)

# Chat streams open with a role-only chunk, then the first token.
UNBATCHED_HEAD = 2


def download_lock(folder: str) -> str:
    """The lock file Ray's downloads into ``folder`` hold (LORA_DOWNLOAD_LOCK)."""
    return folder + ".lock"


class PrunedLoraLoader(LoraModelLoader):
    """Ray's LoRA loader with a bounded disk cache (``e2e_llm.lora_disk_cache``): after each
    download the folder is pruned to ``max_versions`` (LORA_LOAD_MODEL), and before each request
    the adapter's folder is marked used and, where pruning removed it, downloaded again into the
    same path (LORA_DOWNLOAD): Ray and vLLM keep that path, and vLLM reloads the weights from it
    after its own LoRA cache evicted them."""

    def __init__(self, *, lora_root: str, max_versions: int, min_idle_s: float, **options: Any):
        super().__init__(lora_root=lora_root, **options)
        self.max_versions, self.min_idle_s = max_versions, min_idle_s
        self._sources: dict[str, tuple[str, Any]] = {}  # model id -> (its folder, Ray's mirror config)
        self._checked: dict[str, float] = {}  # model id -> when ensure_on_disk last marked it used

    async def load_model(self, lora_model_id: str, lora_mirror_config: Any):
        new = lora_model_id not in self._sources
        disk = await super().load_model(lora_model_id, lora_mirror_config)
        self._sources[lora_model_id] = (disk.local_path, lora_mirror_config)
        if new:
            self._checked[lora_model_id] = time.time()
            await asyncio.to_thread(self._prune_after_download, disk.local_path)
        return disk

    def _prune_after_download(self, folder: str) -> None:
        mark_used(folder)
        prune(self.lora_root, self.max_versions, self.min_idle_s, download_lock)

    async def ensure_on_disk(self, model_id: str) -> None:
        """Before a request for ``model_id``: its folder marked used, and downloaded again where it
        was pruned. A folder marked used is not pruned for ``min_idle_s``, so this touches the disk at
        most twice in that time per adapter."""
        checked_at = time.time()
        if model_id not in self._sources or checked_at - self._checked[model_id] < self.min_idle_s / 2:
            return
        await asyncio.to_thread(self._ensure_on_disk, *self._sources[model_id])
        self._checked[model_id] = checked_at  # only once there: a failed download is tried again

    def _ensure_on_disk(self, folder: str, mirror_config: Any) -> None:
        from filelock import FileLock

        with FileLock(download_lock(folder)):  # pruning checks a folder's last use under this lock
            mark_used(folder)
            complete = is_complete(folder)
        if not complete:
            self._download_lora(mirror_config)
            self._prune_after_download(folder)


class PatchedLLMServer(LLMServer):
    """``ray.serve.llm.LLMServer`` with the two Ray 2.60 workarounds (``RESOLVE_LORA``,
    ``BATCH_OUTPUT_STREAM``) and the adapters' own folder (``lora_cache_root``), pruned where the
    app sets ``serve.adapter_cache`` (``PrunedLoraLoader``)."""

    _lora_locks: defaultdict[str, asyncio.Lock] | None = None
    _lora_loader: PrunedLoraLoader | None = None

    async def __init__(self, llm_config, **kwargs):
        # LORA_LOADER: adapters are downloaded into the folder lora_cache_root names, not Ray's
        # one folder per machine, and pruned there (PrunedLoraLoader) where the app sets limits.
        root = self.lora_cache_root(llm_config)
        if root is not None and kwargs.get("model_downloader") is None:
            limits = limits_from_settings(llm_config.experimental_configs)

            def loader(**options):
                if limits is None:
                    return LoraModelLoader(lora_root=root, **options)
                self._lora_loader = PrunedLoraLoader(lora_root=root, **limits, **options)
                return self._lora_loader

            kwargs["model_downloader"] = loader
        await super().__init__(llm_config, **kwargs)

    def lora_cache_root(self, llm_config) -> str | None:
        """Hook for a subclass: the folder this replica downloads adapters into (None: Ray's)."""
        return None

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        # RESOLVE_LORA: one load per adapter at a time; later requests find it loaded.
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            return await super()._maybe_resolve_lora_from_multiplex()
        if self._lora_locks is None:
            self._lora_locks = defaultdict(asyncio.Lock)
        async with self._lora_locks[model_id]:
            try:
                if self._lora_loader is not None:  # the engine may read its folder again (vLLM reloads)
                    await self._lora_loader.ensure_on_disk(model_id)
                return await super()._maybe_resolve_lora_from_multiplex()
            except Exception as exc:
                await self.adapter_load_failed(model_id, exc)
                raise

    async def adapter_load_failed(self, model_id: str, exc: Exception) -> None:
        """Hook for a subclass: raise a clearer error for an adapter that failed to load;
        returning lets ``exc`` propagate unchanged."""

    _pacer: StreamPacer | None = None

    def _batch_output_stream(self, generator: AsyncGenerator) -> AsyncGenerator[list, None]:
        # BATCH_OUTPUT_STREAM: the first chunks (role, first token) go out at once, then groups
        # paced by the number of open streams (e2e_llm.stream_pacing).
        if self._pacer is None:
            settings = self._llm_config.experimental_configs or {}
            pacing = {key.removeprefix("stream_batching_"): settings.get(key) for key in PACING_KEYS}
            self._pacer = StreamPacer(self._get_batch_interval_ms(), head=UNBATCHED_HEAD, **pacing)
        return self._pacer.batched(generator)


class LocalModelCallback(CallbackBase):
    """For an engine whose model is a folder on the machine: before starting the engine, Ray Serve
    LLM runs one Ray task per node to "download" the model, which for a local folder returns the
    same path but imports vLLM in a fresh worker first (~12 s of a 2-core machine, every start)."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False
