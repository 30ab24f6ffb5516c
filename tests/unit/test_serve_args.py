# SPDX-License-Identifier: Apache-2.0
"""The serving app's arguments from a profile: request limits (strict), the ingress replica's
adapter-store settings, and no single engine replica in the cluster profile."""

from __future__ import annotations

import os
import shutil

import pytest

from e2e_llm.compat import resolve
from e2e_llm.config import ConfigError, load_profile
from e2e_llm.host_cpus import usable_cpus
from e2e_llm.ray_address import own_instance_runtime_env
from e2e_llm.serve import ENDPOINT_ENV, RAY_WORKER_NICENESS_ENV, _with_runtime_endpoint, app_args, ray_init_kwargs


def test_a_typo_in_serve_limits_names_the_key(write_profile):
    path = write_profile(lambda d: d["serve"]["limits"].update(max_nn=4))
    with pytest.raises(ConfigError, match=r"serve\.limits\.max_nn: unknown key"):
        load_profile(str(path))


@pytest.mark.parametrize("key,value", [("max_n", 0), ("max_total_tokens", -1), ("max_body_bytes", 10)])
def test_limits_out_of_range_are_refused(key, value, write_profile):
    path = write_profile(lambda d: d["serve"]["limits"].update({key: value}))
    with pytest.raises(ConfigError, match=rf"serve\.limits\.{key}"):
        load_profile(str(path))


def test_limits_and_retry_reach_the_app_args(project_root):
    config = load_profile("local", root=project_root)
    args = app_args(config)
    assert args["limits"] == {"max_n": config.serve.limits.max_n,
                              "max_total_tokens": config.serve.limits.max_total_tokens,
                              "max_body_bytes": config.serve.limits.max_body_bytes,
                              "default_max_tokens": config.model.max_model_len}
    assert args["retry"] == {"deadline_s": config.serve.retry.deadline_s}


def test_the_ingress_replica_gets_the_store_endpoint_and_region(project_root, monkeypatch):
    for name in ENDPOINT_ENV:
        monkeypatch.delenv(name, raising=False)
    config = load_profile("local", root=project_root)
    env = app_args(config)["ingress_deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert {env[n] for n in ENDPOINT_ENV} == {config.storage.endpoint_url}
    assert env["AWS_DEFAULT_REGION"] == config.storage.region
    assert "OMP_WAIT_POLICY" not in env  # engine-only settings stay on the engine
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    moved = _with_runtime_endpoint(app_args(config))
    ingress_env = moved["ingress_deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert ingress_env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:1234"
    assert moved["ingress_deployment_config"]["ray_actor_options"]["num_cpus"] == 0


def test_the_cluster_profile_has_no_single_engine_or_ingress_replica(project_root):
    from ray.serve.config import AutoscalingConfig

    from e2e_llm.compat.ray_serve import apply_deployment_defaults
    from e2e_llm.ingress import E2EIngress

    config = load_profile("cluster", root=project_root)
    assert config.serve.min_replicas >= 2
    args = app_args(config)
    deployment = args["llm_configs"][0]["deployment_config"]["autoscaling_config"]
    assert deployment["min_replicas"] >= 2
    # The options Serve gets for the ingress (Ray's defaults merged with ours, as build_app does):
    # autoscaling with the engine's bounds, Ray's per-replica target kept.
    defaults = E2EIngress.get_deployment_options()
    ingress = apply_deployment_defaults(defaults, args["ingress_deployment_config"])
    assert (ingress["autoscaling_config"]["min_replicas"], ingress["autoscaling_config"]["max_replicas"]) == (
        config.serve.min_replicas, config.serve.max_replicas)
    assert ingress["autoscaling_config"]["target_ongoing_requests"] == \
        defaults["autoscaling_config"]["target_ongoing_requests"]
    assert AutoscalingConfig(**ingress["autoscaling_config"]).min_replicas >= 2


def test_equal_replica_bounds_give_fixed_replica_counts_without_autoscaling(project_root):
    from ray.serve.llm import LLMConfig

    from e2e_llm.compat.ray_serve import apply_deployment_defaults
    from e2e_llm.ingress import E2EIngress

    config = load_profile("local", root=project_root)
    assert config.serve.min_replicas == config.serve.max_replicas == 1
    args = app_args(config)
    engine = args["llm_configs"][0]["deployment_config"]
    assert engine["num_replicas"] == 1 and "autoscaling_config" not in engine
    ingress = apply_deployment_defaults(E2EIngress.get_deployment_options(), args["ingress_deployment_config"])
    assert ingress["num_replicas"] == 1 and "autoscaling_config" not in ingress
    # Ray Serve LLM validates the engine's options with num_replicas and no autoscaling_config.
    assert LLMConfig.model_validate(args["llm_configs"][0]).deployment_config["num_replicas"] == 1

    config.serve.max_replicas = 3
    args = app_args(config)
    assert args["llm_configs"][0]["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": config.serve.target_ongoing_requests}
    assert args["ingress_deployment_config"]["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}


def test_the_cpu_engine_replica_runs_at_normal_priority_and_the_ingress_does_not(project_root):
    # Ray starts workers at niceness 15; the engine replica (and vLLM's processes forked from it) is
    # told to stay at 0 like a plain vLLM server, the ingress keeps Ray's default.
    config = load_profile("local", root=project_root)
    args = app_args(config)
    assert args["llm_configs"][0]["runtime_env"]["env_vars"][RAY_WORKER_NICENESS_ENV] == "0"
    ingress_env = args["ingress_deployment_config"]["ray_actor_options"]["runtime_env"]["env_vars"]
    assert RAY_WORKER_NICENESS_ENV not in ingress_env


def test_a_gpu_engine_replica_keeps_rays_worker_niceness(project_root):
    config = load_profile("cluster", root=project_root)
    env = (app_args(config)["llm_configs"][0].get("runtime_env") or {}).get("env_vars") or {}
    assert RAY_WORKER_NICENESS_ENV not in env


def test_local_ray_is_started_without_dashboard_and_with_the_profiles_metrics_port(project_root):
    config = load_profile("local", root=project_root)
    kwargs = ray_init_kwargs(config, temp_dir="/tmp/r-x")
    assert kwargs == {"num_cpus": usable_cpus(), "_temp_dir": "/tmp/r-x", "include_dashboard": False,
                      "_metrics_export_port": config.serve.metrics_export_port,
                      "runtime_env": own_instance_runtime_env()}  # {} unless this Python's path has a space


def test_stream_pacing_settings_reach_the_engine_replica(project_root):
    config = load_profile("local", root=project_root)
    config.serve.stream_batching_interval_ms = 500
    config.serve.stream_batching_messages_per_s = 32
    config.serve.stream_batching_max_interval_ms = 2000
    cache = {"adapter_cache_max_versions": 16, "adapter_cache_min_idle_s": 600.0}  # serve.adapter_cache
    assert app_args(config)["llm_configs"][0]["experimental_configs"] == {
        "stream_batching_interval_ms": 500, "stream_batching_messages_per_s": 32,
        "stream_batching_max_interval_ms": 2000, **cache}
    config.serve.stream_batching_interval_ms = None
    config.serve.stream_batching_messages_per_s = config.serve.stream_batching_max_interval_ms = None
    assert app_args(config)["llm_configs"][0]["experimental_configs"] == cache  # Ray's batching defaults


TOGETHER = "set stream_batching_messages_per_s and stream_batching_max_interval_ms together"


@pytest.mark.parametrize("settings,message", [
    ({"stream_batching_messages_per_s": 32}, TOGETHER),
    ({"stream_batching_max_interval_ms": 2000}, TOGETHER),
    ({"stream_batching_interval_ms": 500, "stream_batching_messages_per_s": 32, "stream_batching_max_interval_ms": 100},
     r"must be >= stream_batching_interval_ms \(500"),
    ({"stream_batching_interval_ms": None, "stream_batching_messages_per_s": 32,
      "stream_batching_max_interval_ms": 2000}, "which must be set"),
])
def test_inconsistent_stream_pacing_settings_are_refused_naming_the_key(settings, message, write_profile):
    def edit(d):
        for key in ("stream_batching_interval_ms", "stream_batching_messages_per_s", "stream_batching_max_interval_ms"):
            d["serve"].pop(key, None)
        d["serve"].update(settings)

    with pytest.raises(ConfigError, match=rf"serve\.stream_batching_max_interval_ms.*{message}"):
        load_profile(str(write_profile(edit)))


def test_an_adapter_cache_smaller_than_the_replicas_adapter_slots_is_refused_naming_the_key(write_profile):
    def edit(d):
        d["serve"].update(max_num_adapters_per_replica=4, adapter_cache={"max_versions": 3})

    with pytest.raises(ConfigError, match=r"serve\.adapter_cache.*max_versions 3 must be >= "
                                          r"serve\.max_num_adapters_per_replica \(4\)"):
        load_profile(str(write_profile(edit)))
    path = write_profile(lambda d: d["serve"].update(adapter_cache={"max_versions": 4, "min_idle_s": 0}))
    assert load_profile(str(path)).serve.adapter_cache.min_idle_s == 0


def test_fewer_max_than_min_replicas_is_refused_naming_the_key(write_profile):
    def edit(d):
        d["serve"].update(min_replicas=3, max_replicas=2)

    with pytest.raises(ConfigError, match=r"serve\.max_replicas.*must be >= serve\.min_replicas \(3\)"):
        load_profile(str(write_profile(edit)))


def test_serve_is_started_with_the_profiles_controller_loop_interval(project_root):
    from ray.serve.config import ControllerOptions

    from e2e_llm.serve import CONTROL_LOOP_INTERVAL_ENV, serve_start_kwargs

    config = load_profile("local", root=project_root)
    config.serve.control_loop_interval_s = 0.5
    kwargs = serve_start_kwargs(config, "127.0.0.1", 8123)
    assert kwargs["http_options"] == {"host": "127.0.0.1", "port": 8123}
    options = ControllerOptions.model_validate(kwargs["controller_options"])  # what serve.start accepts
    assert options.runtime_env == {"env_vars": {CONTROL_LOOP_INTERVAL_ENV: "0.5"}}
    config.serve.control_loop_interval_s = None
    assert "controller_options" not in serve_start_kwargs(config, "127.0.0.1", 8123)  # Ray's default


def test_the_loop_interval_setting_is_the_one_ray_serve_reads():
    from e2e_llm.compat.ray_serve import CONTROL_LOOP_INTERVAL, serve_constants_source
    from e2e_llm.serve import CONTROL_LOOP_INTERVAL_ENV

    assert f'"{CONTROL_LOOP_INTERVAL_ENV}"' in serve_constants_source()  # read at import by the controller
    assert resolve(CONTROL_LOOP_INTERVAL, "e2e_llm.compat.ray_serve") == 0.1  # Ray's default: ours is longer


def test_high_throughput_mode_is_settings_ray_serve_reads_and_only_when_the_profile_asks(project_root, monkeypatch):
    from e2e_llm.compat.ray_serve import serve_constants_source
    from e2e_llm.serve import (
        HIGH_THROUGHPUT_ENV,
        LOCAL_HIGH_THROUGHPUT_ENV,
        MODE_FILES_DIR_ENV,
        MODE_FILES_ENV,
        MODE_FIXED_PORTS_ENV,
        mode_files_env,
        serve_mode_env,
    )

    source = serve_constants_source()
    for name in [*HIGH_THROUGHPUT_ENV, *LOCAL_HIGH_THROUGHPUT_ENV, *MODE_FIXED_PORTS_ENV, MODE_FILES_DIR_ENV,
                 *MODE_FILES_ENV]:  # read at import
        assert f'"{name}"' in source, f"{name}: not read by this Ray Serve (renamed?)"
    for name in MODE_FIXED_PORTS_ENV:
        monkeypatch.delenv(name, raising=False)
    config = load_profile("local", root=project_root)
    config.serve.high_throughput = True
    # a cluster's: its ingress drains as Ray decides, HAProxy has the pod's ports to itself
    assert serve_mode_env(config) == HIGH_THROUGHPUT_ENV
    local = serve_mode_env(config, local=True)
    assert local == {**HIGH_THROUGHPUT_ENV, **LOCAL_HIGH_THROUGHPUT_ENV, **{n: local[n] for n in MODE_FIXED_PORTS_ENV},
                     **mode_files_env()}
    config.serve.high_throughput = False
    assert serve_mode_env(config) == {}
    assert serve_mode_env(load_profile("cluster", root=project_root)) == {}  # not tried on a cluster yet


def test_a_local_instance_takes_free_ports_for_the_modes_fixed_ones(project_root, monkeypatch):
    import socket

    from e2e_llm.serve import MODE_FIXED_PORTS_ENV, serve_mode_env

    for name in MODE_FIXED_PORTS_ENV:
        monkeypatch.delenv(name, raising=False)
    config = load_profile("local", root=project_root)
    config.serve.high_throughput = True
    with socket.socket() as taken:  # another program on this machine, as haproxy_exporter on 9101
        taken.bind(("", 0))
        taken.listen()
        held = taken.getsockname()[1]
        ports = [int(serve_mode_env(config, local=True)[name]) for name in MODE_FIXED_PORTS_ENV]
        assert held not in ports and not {8404, 9101, 8500, 9500} & set(ports)  # never Ray's fixed defaults
        assert len(set(ports)) == len(ports)
        for port in ports:  # free on every interface (HAProxy binds its own on all)
            with socket.socket() as probe:
                probe.bind(("", port))
    monkeypatch.setenv(MODE_FIXED_PORTS_ENV[0], "18404")  # the user's choice is kept
    assert serve_mode_env(config, local=True)[MODE_FIXED_PORTS_ENV[0]] == "18404"


def test_serve_is_started_without_access_log_when_the_profile_says_so(project_root):
    from ray.serve.schema import LoggingConfig

    from e2e_llm.serve import serve_start_kwargs

    config = load_profile("local", root=project_root)
    config.serve.access_log = False
    kwargs = serve_start_kwargs(config, "127.0.0.1", 8123)
    assert LoggingConfig.model_validate(kwargs["logging_config"]).enable_access_log is False
    config.serve.access_log = True
    assert "logging_config" not in serve_start_kwargs(config, "127.0.0.1", 8123)  # Ray's default: on


def test_the_access_log_setting_reaches_the_ingress_and_engine_deployments(project_root):
    # serve.start's logging_config covers only the controller and the proxy: the replicas' own
    # access lines ("CALL chat OK", "POST /v1/chat/completions 200") need it as a deployment option.
    from ray import serve
    from ray.serve.llm import LLMConfig

    from e2e_llm.compat.ray_serve import apply_deployment_defaults
    from e2e_llm.ingress import E2EIngress

    config = load_profile("local", root=project_root)
    for enabled in (False, True):
        config.serve.access_log = enabled
        args = app_args(config)
        engine = LLMConfig.model_validate(args["llm_configs"][0]).deployment_config
        ingress = serve.deployment(E2EIngress, **apply_deployment_defaults(
            E2EIngress.get_deployment_options(), args["ingress_deployment_config"]))
        if enabled:  # Ray's default (on) left alone
            assert "logging_config" not in engine and ingress.logging_config is None
        else:
            assert engine["logging_config"]["enable_access_log"] is False
            assert ingress.logging_config["enable_access_log"] is False


def _app_status(messages: dict[str, str]):
    from types import SimpleNamespace

    deployments = {name: SimpleNamespace(message=message) for name, message in messages.items()}
    return SimpleNamespace(applications={"llm": SimpleNamespace(deployments=deployments)})


def test_deploying_says_why_the_app_is_not_up_yet_and_gives_up_when_stopped(local_config, monkeypatch):
    """`serve.min_replicas: 2` on 2 cores: Serve waits for CPUs in silence, and `e2e-llm serve`
    waited with it, deaf to Ctrl-C. Serve's own status messages are now echoed as they change,
    and a stop (Ctrl-C, SIGTERM) ends the wait."""
    import threading

    from ray import serve

    from e2e_llm.serve import DeployFailed, DeployInterrupted, run_app

    scheduled = "1 replicas that have taken more than 30s to be scheduled. Resources required for each replica: " \
                '[{"CPU": 2.0}], total resources available: {}.'
    statuses = iter([{}, {"E2ELLMServer": "1 replicas that have taken more than 30s to initialize."},
                     {"E2ELLMServer": "1 replicas that have taken more than 30s to initialize."},
                     {"E2ELLMServer": scheduled, "Ingress": ""}])
    release = threading.Event()
    monkeypatch.setattr(serve, "status", lambda: _app_status(next(statuses, {"E2ELLMServer": scheduled})))
    monkeypatch.setattr(serve, "run", lambda app, **kw: release.wait(60))
    shown = []
    stop = threading.Event()

    def echo(line):
        shown.append(line)
        if len(shown) == 2:
            stop.set()  # Ctrl-C once the user has read why

    with pytest.raises(DeployInterrupted, match="stopped before the app 'llm' was up"):
        run_app(local_config, object(), stop, echo=echo, poll_s=0.01)
    release.set()
    assert shown == ["[serve] E2ELLMServer: 1 replicas that have taken more than 30s to initialize.",
                     f"[serve] E2ELLMServer: {scheduled}"]

    # Up: returns; a deploy that failed: its error, in the caller's thread.
    monkeypatch.setattr(serve, "run", lambda app, **kw: None)
    run_app(local_config, object(), threading.Event(), echo=shown.append, poll_s=0.01)

    def broken(app, **kw):
        raise RuntimeError("replica crashed")

    monkeypatch.setattr(serve, "run", broken)
    with pytest.raises(DeployFailed, match=r"Serve could not start the app: replica crashed \(each replica's error is "
                                           r"above, after \[serve\]\)"):
        run_app(local_config, object(), threading.Event(), echo=shown.append, poll_s=0.01)


def test_a_cpu_engine_gets_its_kv_cache_as_an_engine_argument_the_profile_can_lower(project_root, monkeypatch):
    """vLLM's VLLM_CPU_KVCACHE_SPACE overrides the engine argument: set for every CPU engine, it
    made a profile's kv_cache_memory_bytes (a small machine's) go unheard."""
    from e2e_llm.batch.pipeline import engine_kwargs as batch_engine_kwargs
    from e2e_llm.serve import CPU_ENGINE_ENV, CPU_KV_CACHE_BYTES, engine_kwargs

    monkeypatch.delenv("E2E_LLM_STORAGE_ROOT", raising=False)
    assert not any(key.startswith("VLLM_CPU_KVCACHE") for key in CPU_ENGINE_ENV)
    for path in ("Makefile", "images/serve/Containerfile.cpu"):  # what `make e2e` and the CPU image set
        assert "VLLM_CPU_KVCACHE_SPACE" not in (project_root / path).read_text(), path
    local = load_profile("local", root=project_root)
    assert engine_kwargs(local)["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    assert batch_engine_kwargs(local, None, "merged")["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES
    local.serve.engine_kwargs["kv_cache_memory_bytes"] = 2**29
    local.batch.engine_kwargs["kv_cache_memory_bytes"] = 2**28
    assert engine_kwargs(local)["kv_cache_memory_bytes"] == 2**29
    assert app_args(local)["llm_configs"][0]["engine_kwargs"]["kv_cache_memory_bytes"] == 2**29
    assert batch_engine_kwargs(local, None, "merged")["kv_cache_memory_bytes"] == 2**28
    cluster = load_profile("cluster", root=project_root)  # GPUs: vLLM's gpu_memory_utilization decides
    assert "kv_cache_memory_bytes" not in engine_kwargs(cluster)
    assert "kv_cache_memory_bytes" not in batch_engine_kwargs(cluster, None, "merged")


def test_the_modes_haproxy_files_go_in_this_users_own_temp_folder(tmp_path, monkeypatch):
    """Ray's default, /tmp/haproxy-serve, belongs to whoever on the machine served first: another
    user's app failed to start there (reproduced as a second user after a root one)."""
    import tempfile

    import ray

    from e2e_llm.compat.ray_serve import serve_constants_source
    from e2e_llm.node_temp import own_temp_dir
    from e2e_llm.serve import MODE_FILES_DIR_ENV, MODE_FILES_ENV, RAY_NODE_ID_HEX, mode_files_env

    assert len(ray.NodeID.from_random().hex()) == RAY_NODE_ID_HEX  # each node's folder of HAProxy files

    for name in [MODE_FILES_DIR_ENV, *MODE_FILES_ENV]:
        monkeypatch.delenv(name, raising=False)
    assert '"/tmp/haproxy-serve/haproxy.cfg"' in serve_constants_source()  # what Ray does without them
    short = tempfile.mkdtemp(prefix="h-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", short)  # TMPDIR
    env = mode_files_env()
    folder = os.path.join(own_temp_dir(), "haproxy")
    assert folder.startswith(short)
    assert env == {MODE_FILES_DIR_ENV: folder,
                   **{name: os.path.join(folder, file) for name, file in MODE_FILES_ENV.items()}}
    monkeypatch.setenv("RAY_SERVE_HAPROXY_SOCKET_PATH", "/run/me/admin.sock")  # the user's own choice stays
    assert mode_files_env()["RAY_SERVE_HAPROXY_SOCKET_PATH"] == "/run/me/admin.sock"
    monkeypatch.delenv("RAY_SERVE_HAPROXY_SOCKET_PATH")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a TMPDIR too long for a socket's path in it
    assert len(os.path.join(own_temp_dir(), "haproxy", "x" * RAY_NODE_ID_HEX, "metrics.sock")) > 107
    assert mode_files_env()[MODE_FILES_DIR_ENV] == os.path.join(own_temp_dir(temp_dir="/tmp"), "haproxy")
    shutil.rmtree(short)
