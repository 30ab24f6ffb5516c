# SPDX-License-Identifier: Apache-2.0
"""The private Ray Serve LLM names in e2e_llm.compat.ray_serve: each resolves in the pinned Ray,
a Ray upgrade that removes or re-signs one fails with the entry's name and purpose, and the two
LLMServer overrides are really called by Ray's request path (and change what it does)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve.llm")

import ray.serve  # noqa: E402
import ray.serve.llm  # noqa: E402
from serve_fakes import fake_server  # noqa: E402

from e2e_llm.compat import CompatError, Entry, resolve  # noqa: E402
from e2e_llm.compat import ray_serve as compat  # noqa: E402

OWNER = "e2e_llm.compat.ray_serve"


def test_every_private_ray_name_resolves_in_the_pinned_ray():
    assert compat.check() == []


def test_a_removed_private_name_fails_naming_the_entry_and_why_it_is_needed(monkeypatch):
    defaults_module = importlib.import_module(compat.DEPLOYMENT_DEFAULTS.module)
    monkeypatch.delattr(defaults_module, "maybe_apply_llm_deployment_config_defaults")
    with pytest.raises(CompatError, match=r"dict_utils\.maybe_apply_llm_deployment_config_defaults: "
                                          r"'maybe_apply_llm_deployment_config_defaults' no longer exists; update the "
                                          r"entry in e2e_llm\.compat\.ray_serve \(needed because: merges"):
        resolve(compat.DEPLOYMENT_DEFAULTS, OWNER)
    assert [m for m in compat.check() if "maybe_apply_llm_deployment_config_defaults" in m]


def test_a_changed_override_signature_fails_with_expected_and_found(monkeypatch):
    monkeypatch.setattr(ray.serve.llm.LLMServer, "_batch_output_stream", lambda self, generator, interval_ms: None)
    with pytest.raises(CompatError, match=r"LLMServer\._batch_output_stream: signature changed, expected "
                                          r"\(self, generator\), found \(self, generator, interval_ms\)"):
        resolve(compat.BATCH_OUTPUT_STREAM, OWNER)


def test_a_removed_override_target_fails_instead_of_silently_never_being_called(monkeypatch):
    internal = ray.serve.llm.LLMServer.__mro__[1]  # the class Ray's public LLMServer re-exports
    monkeypatch.delattr(internal, "_maybe_resolve_lora_from_multiplex")
    with pytest.raises(CompatError, match="_maybe_resolve_lora_from_multiplex' no longer exists"):
        resolve(compat.RESOLVE_LORA, OWNER)


def test_a_moved_module_fails_clearly():
    entry = Entry("ray.llm._internal.no_such_module", "Thing", why="testing")
    with pytest.raises(CompatError, match=r"module ray\.llm\._internal\.no_such_module cannot be imported"):
        resolve(entry, OWNER)


def test_importing_the_compat_module_fails_at_import_when_ray_drops_a_name(monkeypatch):
    ingress_module = importlib.import_module(compat.DEFAULT_ENDPOINTS_ENTRY.module)
    with monkeypatch.context() as patch:
        patch.delattr(ingress_module, "DEFAULT_ENDPOINTS")
        with pytest.raises(CompatError, match="DEFAULT_ENDPOINTS' no longer exists"):
            importlib.reload(compat)
    importlib.reload(compat)


def test_the_base_ingress_keeps_its_model_cards_where_our_ingress_reads_them():
    from ray.serve.llm.ingress import OpenAiIngress

    card = object()
    ingress = OpenAiIngress({"base": object()}, {"base": card})
    assert ingress._model_cards == {"base": card}


def test_the_public_broadcast_api_the_preflight_uses_keeps_its_shape():
    """``DeploymentHandle.broadcast`` is public but alpha in Ray 2.60 (the ingress's /-/preflight
    reaches every engine replica with it): an upgrade that changes it fails here, not live."""
    from ray.serve.handle import DeploymentBroadcastResponse, DeploymentHandle

    assert list(inspect.signature(DeploymentHandle.broadcast).parameters) == ["self", "method_name", "args", "kwargs"]
    assert {"timeout_s", "return_exceptions"} <= set(
        inspect.signature(DeploymentBroadcastResponse.results_async).parameters)
    assert "multiplexed_model_id" in inspect.signature(DeploymentHandle.options).parameters


# -- the overrides are called by Ray's own request path ------------------------------------


async def _timed_chat(server) -> list[tuple[float, list[str]]]:
    """A streamed chat's messages, each with the seconds since the request when it was sent."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    stream = await server.chat(SimpleNamespace(stream=True))
    return [(loop.time() - start, list(batch)) async for batch in stream]


async def _chat(server) -> list[list[str]]:
    return [batch for _, batch in await _timed_chat(server)]


async def _two_first_requests(server) -> None:
    await asyncio.gather(_chat(server), _chat(server))


@pytest.fixture
def adapter_request(monkeypatch):
    monkeypatch.setattr(ray.serve, "get_multiplexed_model_id", lambda: "viggo-v2")


def test_concurrent_first_requests_for_one_adapter_load_it_one_at_a_time(adapter_request):
    from e2e_llm.server import E2ELLMServer

    ours = fake_server(E2ELLMServer)
    asyncio.run(_two_first_requests(ours))
    assert ours.max_active == 1
    # The same path through Ray's own LLMServer loads twice at once (the 2.60 bug).
    ray_default = fake_server(ray.serve.llm.LLMServer)
    asyncio.run(_two_first_requests(ray_default))
    assert ray_default.max_active == 2


def test_a_stream_sends_its_first_chunks_unbatched_then_batches(adapter_request):
    from e2e_llm.server import E2ELLMServer

    server = fake_server(E2ELLMServer, interval_ms=200)
    server.engine.gap_s = 0.01  # one chunk per engine step
    out = asyncio.run(_timed_chat(server))
    batches = [b for _, b in out]
    assert batches[:compat.UNBATCHED_HEAD] == [["c0"], ["c1"]]
    assert out[0][0] < 0.1  # the first chunk is not held for the interval
    assert [c for b in batches for c in b] == [f"c{i}" for i in range(5)]
    assert len(batches) < 5  # the rest is grouped
    # Ray's own LLMServer groups the first chunks too.
    ray_server = fake_server(ray.serve.llm.LLMServer, interval_ms=200)
    ray_server.engine.gap_s = 0.01
    assert len(asyncio.run(_timed_chat(ray_server))[0][1]) > 1


def test_chunks_an_engine_step_produces_together_go_out_as_one_message_at_once(adapter_request):
    from e2e_llm.server import E2ELLMServer

    out = asyncio.run(_timed_chat(fake_server(E2ELLMServer, interval_ms=200)))  # all five in one step
    assert out == [(pytest.approx(0, abs=0.1), ["c0", "c1", "c2", "c3", "c4"])]


def test_the_replica_paces_its_streams_with_the_profiles_settings(adapter_request):
    from e2e_llm.server import E2ELLMServer

    server = fake_server(E2ELLMServer, interval_ms=200)
    server._llm_config.experimental_configs.update(stream_batching_messages_per_s=8,
                                                   stream_batching_max_interval_ms=1000)
    assert [c for b in asyncio.run(_chat(server)) for c in b] == [f"c{i}" for i in range(5)]
    pacer = server._pacer
    assert (pacer.interval_s, pacer.messages_per_s, pacer.max_interval_s) == (0.2, 8, 1.0)
    pacer.open = 6  # many streams open on this replica: a longer interval
    assert pacer.current_interval_s() == pytest.approx(0.75)
    asyncio.run(_chat(server))
    assert server._pacer is pacer  # one pacer per replica: it counts all the replica's streams


class _Handle:
    """Records the options a deployment handle was given (a real one connects to Serve on .options())."""

    def __init__(self, **options):
        self.options_given = options

    def options(self, **options):
        return _Handle(**{**self.options_given, **options})


@pytest.mark.parametrize("grpc", [True, False])
def test_the_ingress_calls_the_engine_by_the_transport_serves_mode_sets_in_its_own_process(monkeypatch, grpc):
    constants = importlib.import_module(compat.GRPC_BY_DEFAULT.module)
    monkeypatch.setattr(constants, compat.GRPC_BY_DEFAULT.name, grpc)
    assert compat.with_mode_transport(_Handle()).options_given == {"_by_reference": not grpc}


def test_the_handle_option_that_picks_the_transport_is_still_rays():
    from ray.serve.handle import DeploymentHandle

    assert "_by_reference" in inspect.signature(DeploymentHandle.options).parameters


def test_serves_high_throughput_mode_is_what_turns_grpc_on_in_the_pinned_ray():
    """The ingress's transport follows the mode only if the mode still sets this constant."""
    assert "RAY_SERVE_USE_GRPC_BY_DEFAULT" in compat.serve_constants_source().split(
        "if RAY_SERVE_THROUGHPUT_OPTIMIZED:", 1)[1]


def test_the_worker_niceness_setting_the_engine_replica_gets_is_rays():
    from e2e_llm.serve import CPU_ENGINE_ENV, RAY_WORKER_NICENESS_ENV

    assert resolve(compat.WORKER_NICENESS, OWNER) == RAY_WORKER_NICENESS_ENV
    assert CPU_ENGINE_ENV[RAY_WORKER_NICENESS_ENV] == "0"


class _IdleEngine:
    def __init__(self, llm_config):
        pass

    async def start(self):
        pass


def _constructed_loader_roots(monkeypatch, server_cls, store_uri: str) -> list:
    """The lora_root each LoRA loader a real (async) server construction makes is given."""
    from ray.llm._internal.serve.core.server import llm_server  # only to silence telemetry here
    from ray.serve.llm import LLMConfig

    roots = []

    class RecordingLoader:
        def __init__(self, lora_root=None, download_timeout_s=None, max_tries=1):
            roots.append(lora_root)

    monkeypatch.setattr(compat, "LoraModelLoader", RecordingLoader)
    monkeypatch.setattr(llm_server, "LoraModelLoader", RecordingLoader)
    monkeypatch.setattr(llm_server, "push_telemetry_report_for_all_models", lambda **_: None)
    config = LLMConfig(model_loading_config={"model_id": "base"},
                       lora_config={"dynamic_lora_loading_path": store_uri})
    server = server_cls.__new__(server_cls)
    asyncio.run(server_cls.__init__(server, config, engine_cls=_IdleEngine))
    return roots


def test_the_profiles_adapter_cache_limits_give_the_pruned_loader_checked_before_each_load(monkeypatch,
                                                                                            adapter_request):
    """serve.adapter_cache reaches the replica's loader, and a request for an adapter first has its
    folder checked (and downloaded again where pruned) before Serve's multiplexer and the engine
    look at it."""
    from ray.llm._internal.serve.core.server import llm_server
    from ray.serve.llm import LLMConfig

    from e2e_llm.config import AdapterCache
    from e2e_llm.lora_disk_cache import adapter_cache_settings
    from e2e_llm.server import E2ELLMServer

    monkeypatch.setattr(llm_server, "push_telemetry_report_for_all_models", lambda **_: None)
    config = LLMConfig(model_loading_config={"model_id": "base"},
                       lora_config={"dynamic_lora_loading_path": "s3://b/adapters"},
                       experimental_configs=adapter_cache_settings(AdapterCache(max_versions=3, min_idle_s=5)))
    server = E2ELLMServer.__new__(E2ELLMServer)
    asyncio.run(E2ELLMServer.__init__(server, config, engine_cls=_IdleEngine))
    loader = server._lora_loader
    assert isinstance(loader, compat.PrunedLoraLoader) and (loader.max_versions, loader.min_idle_s) == (3, 5)
    assert loader.lora_root.endswith(os.path.basename(server.lora_cache_root(config)))

    calls = []

    async def ensure_on_disk(model_id):
        calls.append(("ensure", model_id))

    async def load_model(model_id):
        calls.append(("load", model_id))
        return model_id

    async def resolve_lora(disk):
        calls.append(("engine", disk))

    monkeypatch.setattr(loader, "ensure_on_disk", ensure_on_disk)
    server._load_model, server.engine = load_model, SimpleNamespace(resolve_lora=resolve_lora)
    asyncio.run(server._maybe_resolve_lora_from_multiplex())
    assert calls == [("ensure", "viggo-v2"), ("load", "viggo-v2"), ("engine", "viggo-v2")]

    async def store_down(model_id):
        raise OSError("connection refused")

    async def adapter_load_failed(model_id, exc):
        calls.append(("failed", model_id, str(exc)))

    calls.clear()
    monkeypatch.setattr(loader, "ensure_on_disk", store_down)
    monkeypatch.setattr(server, "adapter_load_failed", adapter_load_failed)
    with pytest.raises(OSError):
        asyncio.run(server._maybe_resolve_lora_from_multiplex())
    # A pruned version the store cannot give back fails as an unloaded one does (503 naming the store).
    assert calls == [("failed", "viggo-v2", "connection refused")]


def test_adapters_download_into_one_folder_per_store_not_rays_one_per_machine(monkeypatch):
    from e2e_llm.server import E2ELLMServer, lora_cache_dir

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9001")
    assert _constructed_loader_roots(monkeypatch, E2ELLMServer, "s3://b/adapters") == [
        lora_cache_dir("s3://b/adapters", "http://127.0.0.1:9001")]
    # Ray's own server puts every store's adapters in its one folder (the collision).
    assert _constructed_loader_roots(monkeypatch, ray.serve.llm.LLMServer, "s3://b/adapters") == [None]


def test_two_stores_never_share_an_adapter_folder_and_one_store_always_does():
    from e2e_llm.server import lora_cache_dir

    one = lora_cache_dir("s3://b/adapters", "http://127.0.0.1:9001")
    assert lora_cache_dir("s3://b/adapters/", "http://127.0.0.1:9001") == one
    assert lora_cache_dir("s3://b/adapters", "http://127.0.0.1:9002") != one  # same bucket, another server
    assert lora_cache_dir("s3://b/other", "http://127.0.0.1:9001") != one
    assert lora_cache_dir("s3://b/adapters", None) != one


def test_the_adapter_folders_are_in_this_users_own_temp_folder(monkeypatch, tmp_path):
    """A machine several people use: a shared /tmp/e2e-llm belonged to whoever served first, and
    the next user's replicas could not download adapters into it."""
    from e2e_llm.server import lora_cache_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = lora_cache_dir("s3://b/adapters", None)
    own = tmp_path / f"e2e-llm-{os.getuid()}"
    assert Path(folder).parent.parent == own and stat.S_IMODE(own.stat().st_mode) == 0o700


def test_a_local_model_folder_skips_rays_node_download_task_a_hub_model_keeps_it(local_config, tmp_path):
    from ray.serve.llm import LLMConfig

    from e2e_llm.serve import app_args

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    local = local_config.model_copy(update={"model": local_config.model.model_copy(update={"source": str(model_dir)})})
    llm = LLMConfig(**app_args(local)["llm_configs"][0])
    assert llm.callback_config.callback_class == "e2e_llm.compat.ray_serve:LocalModelCallback"
    hub = local_config.model_copy(update={"model": local_config.model.model_copy(
        update={"source": "hf:HuggingFaceTB/SmolLM2-135M-Instruct"})})
    assert "callback_config" not in app_args(hub)["llm_configs"][0]

    # the class Ray loads from that string, and what it does: the engine then skips initialize_node
    callback = compat.LocalModelCallback(llm_config=llm, ctx_kwargs={"runtime_env": {}})
    assert callback.ctx.run_init_node is True
    asyncio.run(callback.on_before_node_init())
    assert callback.ctx.run_init_node is False
    engine = importlib.import_module("ray.llm._internal.serve.engines.vllm.vllm_engine")
    assert "callback.ctx.run_init_node" in inspect.getsource(engine.VLLMEngine.start)
