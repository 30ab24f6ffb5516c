# SPDX-License-Identifier: Apache-2.0
"""The serving application: one builder for `e2e-llm serve`, the Anyscale service and the
KubeRay RayService.

``app_args(config)`` turns a profile into JSON-serialisable builder arguments (the
``ray.serve.llm.LLMConfig`` fields plus our auth and adapter-store settings); the rendered
service YAMLs carry exactly this dict as ``args`` next to ``import_path:
e2e_llm.serve:build_app``. ``build_app(args)`` returns the Ray Serve application: Ray's
``LLMServer`` deployment behind our OpenAI ingress (``e2e_llm.ingress``), which adds API-key
auth, alias routing with canary weights from the adapter store, per-version metrics and
clear 404s for unknown adapters. Nothing runs at import; Ray and vLLM are imported inside
the functions.

Usage:
    from e2e_llm.serve import app_args, build_app
    serve.run(build_app(app_args(load_profile("local"))), name="llm")
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path
from typing import Any

from e2e_llm.adapters import vllm_max_lora_rank
from e2e_llm.config import PipelineConfig
from e2e_llm.lora_disk_cache import adapter_cache_settings
from e2e_llm.model import model_location
from e2e_llm.ports import free_tcp_port
from e2e_llm.precision import serve_device
from e2e_llm.storage import ENDPOINT_ENV, s3_endpoint
from e2e_llm.stream_pacing import PACING_KEYS

# Ray starts every worker process (actors: Serve's proxy, controller and replicas) at niceness 15,
# below its own daemons and below any other program on the machine; this Ray setting (the one its
# job manager uses for job drivers) keeps a process at its parent's priority. Name checked
# against the pinned Ray by tests/unit/test_compat_ray_serve.py (compat.ray_serve.WORKER_NICENESS).
RAY_WORKER_NICENESS_ENV = "RAY_worker_niceness"
# Environment passed to the engine replicas on a CPU-only profile (see ENVIRONMENT-NOTES.md).
# Niceness 0: the engine (replica, vLLM's EngineCore and the worker that runs the model, forked from
# it) runs at the priority a plain `vllm serve` runs at. At Ray's 15 it lost CPU to Ray's own
# daemons (GCS, raylet, agents) and to every other process on a small CPU box: 0.82x plain vLLM's
# throughput on 2 AVX2 cores; bench/RESULTS.md "serve_latency_vs_vllm". Proxy, controller and
# ingress stay at 15, below the engine.
CPU_ENGINE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", RAY_WORKER_NICENESS_ENV: "0"}
# A CPU engine's KV cache, vLLM's engine argument ``kv_cache_memory_bytes`` unless the profile's
# engine_kwargs set it: vLLM's CPU default asks for 92% of the machine's memory and fails on any
# machine running something else. Not vLLM's VLLM_CPU_KVCACHE_SPACE: that environment variable
# overrides the engine argument, and a profile that lowered it for a small machine went unheard.
CPU_KV_CACHE_BYTES = 2 * 2**30


def cpu_engine_kwargs() -> dict[str, Any]:
    """Engine arguments every CPU engine (batch and serve) starts from; the profile's win."""
    return {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}


# Ray Serve's setting for its controller's loop period (documented; default 0.1 s).
CONTROL_LOOP_INTERVAL_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"
# Ray Serve's high-throughput mode, as Ray documents it ("Enable High Throughput on Ray Serve with
# KubeRay", Ray >= 2.56): HAProxy takes HTTP on the Serve port and hands it to the ingress replicas,
# which serve it themselves (no Python proxy hop); replicas talk gRPC; user code runs on the
# replica's own event loop. Every process of the Ray instance reads these at start.
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
# In that mode a stopping ingress replica keeps answering for at least 30 s, so that load balancers
# outside the cluster notice it draining. Where e2e-llm starts Ray itself nothing is outside: the
# HAProxy in front stops with it, and Ctrl-C (or the tests' app) need not wait.
LOCAL_HIGH_THROUGHPUT_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
# Listeners of that mode at fixed ports: HAProxy's stats page and Prometheus exporter (Ray's defaults
# 8404 and 9101, on every interface) and Serve's fallback Python proxy behind it (8500, and 9500 for
# gRPC). In a Ray pod that is the pod's business; on the user's machine another program on one of them
# (9101 is haproxy_exporter's) keeps HAProxy or the proxy from starting, and a second app would share
# them. Where e2e-llm starts Ray itself each instance takes free ports (one the user set is kept).
MODE_FIXED_PORTS_ENV = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
# And at fixed paths: HAProxy's config, sockets and server state, in a folder per Ray node under
# /tmp/haproxy-serve, which belongs to whoever on the machine served first: every other user's app
# failed to start (PermissionError in Serve's HAProxyManager). Where e2e-llm starts Ray itself they
# go in this user's own temp folder (e2e_llm.node_temp), under the names Ray gives them; a path the
# user set is kept. The folder setting and the file settings, with each file's name:
MODE_FILES_DIR_ENV = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
MODE_FILES_ENV = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                  "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
                  "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}
MODE_FILES_DIR = "haproxy"  # in this user's own temp folder
RAY_NODE_ID_HEX = 56  # Ray's node id, the name of each node's folder there


class ServeError(RuntimeError):
    pass


def recipe_lora_rank(config: PipelineConfig) -> int:
    """The LoRA rank the training recipe produces (LLaMA-Factory ``lora_rank``, default 8)."""
    import yaml

    recipe = yaml.safe_load(config.path(config.train.recipe).read_text(encoding="utf-8")) or {}
    return int(recipe.get("lora_rank", 8))


def serving_max_lora_rank(config: PipelineConfig) -> int:
    """The replicas' ``max_lora_rank``: the training recipe's rank rounded up to one vLLM accepts.
    Publishing refuses adapters above it."""
    return vllm_max_lora_rank(recipe_lora_rank(config))


def engine_kwargs(config: PipelineConfig) -> dict[str, Any]:
    """vLLM engine arguments: model length and dtype from ``model``, LoRA limits derived from
    the training recipe's rank and the replica's adapter budget, then ``serve.engine_kwargs``."""
    from e2e_llm.precision import serve_dtype

    serve = config.serve
    kwargs: dict[str, Any] = {
        "max_model_len": config.model.max_model_len,
        "dtype": serve_dtype(config).dtype,
        "enable_lora": True,
        "max_loras": serve.max_num_adapters_per_replica,
        "max_lora_rank": serving_max_lora_rank(config),
    }
    if serve.num_gpus_per_replica > 1:
        kwargs["tensor_parallel_size"] = serve.num_gpus_per_replica
    if serve_device(config) == "cpu":
        kwargs.update(cpu_engine_kwargs())
    kwargs.update(serve.engine_kwargs)
    return kwargs


def replica_options(config: PipelineConfig, target_ongoing_requests: int | None = None) -> dict[str, Any]:
    """How many replicas a deployment of the app runs, as Serve deployment options: a fixed
    ``num_replicas`` when the profile's ``serve.min_replicas`` and ``max_replicas`` agree (Serve then
    records, pushes and evaluates no autoscaling metrics: CPU a small box's engine gets instead),
    else an ``autoscaling_config`` between them."""
    serve = config.serve
    if serve.min_replicas == serve.max_replicas:
        return {"num_replicas": serve.min_replicas}
    autoscaling: dict[str, Any] = {"min_replicas": serve.min_replicas, "max_replicas": serve.max_replicas}
    if target_ongoing_requests is not None:
        autoscaling["target_ongoing_requests"] = target_ongoing_requests
    return {"autoscaling_config": autoscaling}


def deployment_logging(config: PipelineConfig) -> dict[str, Any]:
    """The app's deployment options for logging: Serve's access log (a line per request) off in the
    ingress and the engine replicas when ``serve.access_log`` is false. A deployment option, so
    the rendered services carry it too; ``serve.start``'s ``logging_config`` reaches only the
    controller and the proxy (:func:`serve_start_kwargs`)."""
    return {} if config.serve.access_log else {"logging_config": {"enable_access_log": False}}


def app_args(config: PipelineConfig) -> dict[str, Any]:
    """JSON-serialisable arguments for :func:`build_app` (the Serve application ``args``)."""
    serve = config.serve
    store_uri = config.adapters_uri()
    cpu = serve_device(config) == "cpu"

    env: dict[str, str] = {}
    if config.storage.endpoint_url:
        env.update({name: config.storage.endpoint_url for name in ENDPOINT_ENV})
    if "://" in store_uri:
        env["AWS_DEFAULT_REGION"] = config.storage.region
    if cpu:
        env.update(CPU_ENGINE_ENV)

    model_source = model_location(config.model, root=config.root)
    llm_config: dict[str, Any] = {
        "model_loading_config": {"model_id": config.model.id, "model_source": model_source},
        "engine_kwargs": engine_kwargs(config),
        "lora_config": {
            "dynamic_lora_loading_path": store_uri,
            "max_num_adapters_per_replica": serve.max_num_adapters_per_replica,
        },
        "deployment_config": {
            **replica_options(config, target_ongoing_requests=serve.target_ongoing_requests),
            "max_ongoing_requests": serve.max_ongoing_requests,
            **deployment_logging(config),
        },
        "log_engine_metrics": True,
        # LLMServer + per-adapter load lock (concurrent first requests for a new adapter).
        "server_cls": "e2e_llm.server:E2ELLMServer",
    }
    if Path(model_source).is_dir():
        # A model in a local folder has nothing to download on the node: skip Ray's download task.
        llm_config["callback_config"] = {"callback_class": "e2e_llm.compat.ray_serve:LocalModelCallback"}
    batching = {key: getattr(serve, key) for key in ("stream_batching_interval_ms", *PACING_KEYS)
                if getattr(serve, key) is not None}
    # Ray reads the interval; e2e_llm.server's replica reads the rest (e2e_llm.stream_pacing) and
    # the adapter cache's limits (e2e_llm.lora_disk_cache).
    llm_config["experimental_configs"] = {**batching, **adapter_cache_settings(serve.adapter_cache)}
    if cpu:
        llm_config["accelerator_config"] = {"kind": "cpu"}
    elif serve.accelerator_type:
        llm_config["accelerator_type"] = serve.accelerator_type
    if env:
        llm_config["runtime_env"] = {"env_vars": env}

    # As many ingress replicas as engine replicas (Ray's default is one: a single point of failure in
    # front of a multi-replica engine); the ingress keeps Ray's target load per replica.
    ingress: dict[str, Any] = {**replica_options(config), **deployment_logging(config)}
    if cpu:
        # On a small CPU box the ingress must not hold a core, or it is never scheduled.
        ingress["ray_actor_options"] = {"num_cpus": 0}
    store_env = {k: v for k, v in env.items() if k not in CPU_ENGINE_ENV}
    if store_env:
        # The ingress reads the adapter store too (aliases, /v1/models): same endpoint and region.
        ingress.setdefault("ray_actor_options", {})["runtime_env"] = {"env_vars": store_env}

    return {
        "llm_configs": [llm_config],
        "ingress_deployment_config": ingress,
        "auth": {"enabled": serve.auth.enabled, "api_key_env": serve.auth.api_key_env},
        "limits": {**serve.limits.model_dump(), "default_max_tokens": config.model.max_model_len},
        "retry": serve.retry.model_dump(),
        "adapter_store": {
            "uri": store_uri,
            "endpoint_url": config.storage.endpoint_url,
            "region": config.storage.region,
            "alias_refresh_s": serve.alias_refresh_s,
        },
    }


def serve_mode_env(config: PipelineConfig, *, local: bool = False) -> dict[str, str]:
    """Environment every process of a Ray instance that serves ``config`` needs from its start
    (``serve.high_throughput``): in the serving cluster's containers (e2e_llm.render_kuberay), or
    (``local``) in ``os.environ`` before ``ray.init`` where e2e-llm starts Ray itself, the mode's
    fixed ports then free ones of this machine."""
    if not config.serve.high_throughput:
        return {}
    if not local:
        return dict(HIGH_THROUGHPUT_ENV)
    ports = {name: os.environ.get(name) or str(free_tcp_port()) for name in MODE_FIXED_PORTS_ENV}
    return {**HIGH_THROUGHPUT_ENV, **LOCAL_HIGH_THROUGHPUT_ENV, **ports, **mode_files_env()}


def mode_files_env() -> dict[str, str]:
    """HAProxy's files (:data:`MODE_FILES_ENV`) in this user's own temp folder, where no other
    user's first app has made the folder theirs: ``TMPDIR``'s, or ``/tmp``'s where a socket's path
    in the other would be longer than a Unix socket path may be."""
    from e2e_llm.node_temp import UNIX_SOCKET_PATH_MAX, own_temp_dir

    longest = max(len(file) for file in MODE_FILES_ENV.values())
    folder = os.path.join(own_temp_dir(), MODE_FILES_DIR)
    if len(folder.encode()) + 2 + RAY_NODE_ID_HEX + longest > UNIX_SOCKET_PATH_MAX:  # <folder>/<node id>/<file>
        folder = os.path.join(own_temp_dir(temp_dir="/tmp"), MODE_FILES_DIR)
    folder = os.environ.get(MODE_FILES_DIR_ENV) or folder
    return {MODE_FILES_DIR_ENV: folder,
            **{name: os.environ.get(name) or os.path.join(folder, file) for name, file in MODE_FILES_ENV.items()}}


def ray_init_kwargs(config: PipelineConfig, temp_dir: str | None = None) -> dict[str, Any]:
    """``ray.init`` options for a local Ray instance that serves ``config`` (``e2e-llm serve``
    and bench/serve_latency.py): the CPUs this process can use (:mod:`e2e_llm.host_cpus`), no
    dashboard, and a fixed metrics port (``serve.metrics_export_port``) the canary's SLO gate can
    scrape."""
    from e2e_llm.host_cpus import usable_cpus
    from e2e_llm.ray_address import own_instance_runtime_env

    return {"num_cpus": usable_cpus(), "_temp_dir": temp_dir, "include_dashboard": False,
            "_metrics_export_port": config.serve.metrics_export_port, "runtime_env": own_instance_runtime_env()}


def serve_start_kwargs(config: PipelineConfig, host: str, port: int) -> dict[str, Any]:
    """``serve.start`` options for a Serve instance that e2e-llm starts itself (``e2e-llm serve``,
    bench/serve_latency.py): HTTP on ``host:port``, the proxy's access log off unless ``serve.access_log``
    (the app's deployments: :func:`deployment_logging`),
    and the controller's loop interval
    (``serve.control_loop_interval_s``, through Ray's documented ``RAY_SERVE_CONTROL_LOOP_INTERVAL_S``
    in the controller's environment) when the profile sets one."""
    kwargs: dict[str, Any] = {"http_options": {"host": host, "port": port}}
    if not config.serve.access_log:
        kwargs["logging_config"] = {"enable_access_log": False}
    if config.serve.control_loop_interval_s is not None:
        kwargs["controller_options"] = {"runtime_env": {"env_vars": {
            CONTROL_LOOP_INTERVAL_ENV: str(config.serve.control_loop_interval_s)}}}
    return kwargs


def start_refusals(config: PipelineConfig, host: str, port: int, ports: bool = True) -> list[tuple[int, str]]:
    """Why serving ``config`` on ``host:port`` cannot start on this machine now, as (exit code,
    message): ``e2e-llm serve`` refuses with the first before it starts anything, and ``make e2e``
    asks before its first stage, not after training (``ports=False``: not the ports, which another
    pipeline's serve stage holds until its turn ends). Empty: nothing in the way."""
    from e2e_llm.memory import shm_problem
    from e2e_llm.ports import port_taken

    refusals = []
    if config.serve.auth.enabled and not os.environ.get(config.serve.auth.api_key_env):
        refusals.append((2, f"serve.auth.enabled but ${config.serve.auth.api_key_env} is not set"))
    if config.serve.num_gpus_per_replica == 0 and (problem := shm_problem()):  # the engines start here
        refusals.append((1, problem))
    if not ports:
        return refusals
    if port_taken(host, port):
        refusals.append((1, f"{host}:{port} is in use by another program: stop it, or serve elsewhere with "
                            f"serve.port in {config.source_file} (e2e-llm serve: --port)"))
    metrics_port = config.serve.metrics_export_port
    if metrics_port and port_taken("", metrics_port):  # Ray's metrics agent listens on every interface
        # Another `e2e-llm serve` on this machine, most likely: Ray's agent would fail to bind it and
        # Ray report "the node timed out during startup" a minute later.
        refusals.append((1, f"port {metrics_port} (serve.metrics_export_port, where the canary reads Ray's metrics) "
                            f"is in use by another program, e.g. another `e2e-llm serve`: give this profile "
                            f"another one in {config.source_file}"))
    return refusals


class DeployInterrupted(RuntimeError):
    """``stop`` was set (Ctrl-C, SIGTERM) before the app was up."""


class DeployFailed(RuntimeError):
    """Serve gave up on the app (a replica that kept failing to start); why was echoed before."""


def run_app(config: PipelineConfig, app: Any, stop: threading.Event, echo=print, poll_s: float = 5.0) -> None:
    """``serve.run`` the app, saying why it is not up yet, and giving up when ``stop`` is set.

    Serve deploys in silence: a replica it cannot place (``serve.min_replicas: 2`` where the CPUs
    hold one engine) kept `e2e-llm serve` waiting for ever, deaf to Ctrl-C. Each new status message
    of a deployment (``serve.status()``: the resources a replica needs and those available, a
    replica's start-up error) is echoed while ``serve.run`` waits in a thread. Raises
    :class:`DeployInterrupted` or :class:`DeployFailed`."""
    from ray import serve

    done = threading.Event()
    failure: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name=config.serve.app_name, route_prefix=config.serve.route_prefix)
        except BaseException as exc:  # noqa: BLE001  re-raised in the caller's thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=deploy, name="e2e-llm-deploy", daemon=True).start()
    said: dict[str, str] = {}
    while not done.wait(poll_s):
        if stop.is_set():
            raise DeployInterrupted(f"stopped before the app {config.serve.app_name!r} was up")
        for name, message in deployment_messages(config.serve.app_name).items():
            if said.get(name) != message:
                said[name] = message
                echo(f"[serve] {name}: {message}")
    if failure:
        if isinstance(failure[0], Exception):
            raise DeployFailed(f"Serve could not start the app: {failure[0]} (each replica's error is above, "
                               "after [serve])") from failure[0]
        raise failure[0]


def deployment_messages(app_name: str) -> dict[str, str]:
    """Each deployment of ``app_name`` with a status message now (Serve's own words), by name."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001  the controller busy or starting: ask again next time
        return {}
    if app is None:
        return {}
    return {name: d.message for name, d in app.deployments.items() if d.message}


def _with_runtime_endpoint(args: dict[str, Any]) -> dict[str, Any]:
    """Let AWS_ENDPOINT_URL(_S3) of the process building the app (tests, a moto port chosen at
    run time) win over the profile's endpoint, for the replicas and the store alike."""
    endpoint = s3_endpoint(None)
    if not endpoint:
        return args
    args = copy.deepcopy(args)
    args["adapter_store"]["endpoint_url"] = endpoint
    ingress_options = args.setdefault("ingress_deployment_config", {}).setdefault("ray_actor_options", {})
    for env in [llm_config.setdefault("runtime_env", {}).setdefault("env_vars", {}) for llm_config in
                args["llm_configs"]] + [ingress_options.setdefault("runtime_env", {}).setdefault("env_vars", {})]:
        env.update({name: endpoint for name in ENDPOINT_ENV})
    return args


def build_app(args: dict[str, Any]):
    """The Ray Serve application for ``args`` (from :func:`app_args`): Ray Serve LLM's
    ``LLMServer`` deployments behind the e2e-llm OpenAI ingress."""
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment

    from e2e_llm.compat.ray_serve import apply_deployment_defaults, to_model_metadata
    from e2e_llm.ingress import E2EIngress, make_ingress

    args = _with_runtime_endpoint(args)
    llm_configs = [LLMConfig.model_validate(c) for c in args["llm_configs"]]
    for c in llm_configs:
        source = c.model_loading_config.model_source
        if isinstance(source, str) and source.startswith("/") and not Path(source).is_dir():
            raise ServeError(f"model {c.model_id!r}: {source} does not exist (run `e2e-llm model`)")
    store = args["adapter_store"]
    auth = args["auth"]

    deployments = {c.model_id: build_llm_deployment(c) for c in llm_configs}
    model_cards = {c.model_id: to_model_metadata(c.model_id, c) for c in llm_configs}
    lora_paths = {c.model_id: c.lora_config.dynamic_lora_loading_path for c in llm_configs if c.lora_config}
    options = apply_deployment_defaults(
        E2EIngress.get_deployment_options(llm_configs), args.get("ingress_deployment_config") or {}
    )
    limits = args.get("limits") or {}
    ingress_cls = make_ingress(auth_enabled=auth["enabled"], api_key_env=auth["api_key_env"],
                               **({"max_body_bytes": limits["max_body_bytes"]} if "max_body_bytes" in limits else {}))
    return serve.deployment(ingress_cls, **options).bind(
        llm_deployments=deployments,
        model_cards=model_cards,
        lora_paths=lora_paths,
        store_uri=store["uri"],
        store_endpoint_url=store.get("endpoint_url"),
        store_region=store.get("region"),
        alias_refresh_s=store.get("alias_refresh_s", 2.0),
        auth_enabled=auth["enabled"],
        api_key_env=auth["api_key_env"],
        limits=limits,
        retry_deadline_s=(args.get("retry") or {}).get("deadline_s", 60.0),
    )
