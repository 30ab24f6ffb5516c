# SPDX-License-Identifier: Apache-2.0
"""The canary controller's connections to the world (the interfaces of :mod:`e2e_llm.canary`):

- :class:`StoreRouter`: the alias records in the adapter store (:mod:`e2e_llm.store`), which
  every ingress replica re-reads; weights are fractions there, percentages in the controller.
- :class:`HttpPreflight`: the ingress's ``POST /-/preflight`` (every engine replica loads the
  version and answers one canary row), before the candidate gets any traffic.
- :class:`OpenAIProber`: the canary set sent to one adapter version through the app's OpenAI
  API (``model="<base>:<version>"``), greedy, with the task's structured output if asked.
- :class:`ScrapeMetrics`: Ray's Prometheus endpoint(s) scraped directly (local Ray, a head
  node); :class:`PrometheusQueryMetrics`: a Prometheus server's query API (a cluster, where
  every pod is scraped by the PodMonitor). Both return cumulative per-version counters of the
  ingress metrics (``ray_e2e_llm_requests_total``, ``ray_e2e_llm_request_latency_seconds``).
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from e2e_llm.api_guard import CLIENT_CLOSED_REQUEST
from e2e_llm.canary_gates import AliasState, Answer, PreflightResult, RouterConflict, VersionStats
from e2e_llm.canary_policy import QualityPolicy
from e2e_llm.data import chat_messages

REQUESTS = "ray_e2e_llm_requests_total"
LATENCY_BUCKET = "ray_e2e_llm_request_latency_seconds_bucket"
# Answers that say nothing about the version's health.
NOT_ERRORS = {401, 403, 429, CLIENT_CLOSED_REQUEST}


def is_error(status: str | int, count_client_errors: bool = True) -> bool:
    try:
        code = int(status)
    except (TypeError, ValueError):
        return True
    if code >= 500:
        return True
    return count_client_errors and code >= 400 and code not in NOT_ERRORS


# ---------------------------------------------------------------------------------------
# Alias records


class StoreRouter:
    """Alias records in the adapter store. ``set`` is conditional on the revision this router's
    last ``get`` of the alias saw (:class:`RouterConflict` if another writer got in between)."""

    def __init__(self, store):
        self.store = store
        self._revisions: dict[str, int] = {}

    def get(self, alias: str) -> AliasState | None:
        record = self.store.aliases().get(alias)
        self._revisions[alias] = record.revision if record else 0
        if record is None:
            return None
        return AliasState(record.stable, record.candidate, round(record.candidate_weight * 100, 6))

    def set(self, alias: str, state: AliasState) -> None:
        from e2e_llm.store import AliasConflict

        if state.stable is None:
            raise ValueError(f"alias {alias!r} needs a stable version")
        try:
            record = self.store.set_alias(alias, stable=state.stable, candidate=state.candidate,
                                          candidate_weight=state.candidate_weight / 100.0 if state.candidate else 0.0,
                                          expected_revision=self._revisions.get(alias))
        except AliasConflict as exc:
            self._revisions.pop(alias, None)
            raise RouterConflict(str(exc)) from None
        self._revisions[alias] = record.revision


# ---------------------------------------------------------------------------------------
# Quality probes


class OpenAIProber:
    """Sends canary rows to ``<base>:<version>`` over the OpenAI API (no client retries: an
    error is an answer the gate must see)."""

    def __init__(self, base_url: str, base_model: str, *, api_key: str | None = None, output_regex: str | None = None,
                 client_factory: Callable[..., Any] | None = None):
        self.base_url = base_url.rstrip("/")
        self.base_model = base_model
        self.api_key = api_key or "not-needed"
        self.output_regex = output_regex
        self._factory = client_factory

    def _client(self, timeout: float):
        return openai_client(self.base_url, self.api_key, timeout, self._factory)

    def probe(self, version: str, rows: Sequence[dict[str, str]], policy: QualityPolicy,
              timeout_s: float | None = None) -> list[Answer]:
        timeout_s = policy.timeout_s if timeout_s is None else timeout_s
        client = self._client(timeout_s)
        model = f"{self.base_model}:{version}"
        extra = {"structured_outputs": {"regex": self.output_regex}} if policy.structured_output and self.output_regex \
            else None

        def one(row: dict[str, str]) -> Answer:
            start = time.monotonic()
            try:
                response = client.chat.completions.create(
                    model=model,
                    messages=chat_messages(row),
                    max_tokens=policy.max_tokens, temperature=0.0, extra_body=extra)
                text = response.choices[0].message.content or ""
                return Answer(text.strip(), None, time.monotonic() - start)
            except Exception as exc:  # noqa: BLE001  every failure is a failed answer
                took = time.monotonic() - start
                return Answer(None, f"{type(exc).__name__}: {str(exc)[:300]}", took, timed_out=_timed_out(exc))

        with ThreadPoolExecutor(min(policy.concurrency, len(rows)) or 1) as pool:
            return list(pool.map(one, rows))


def openai_client(base_url: str, api_key: str, timeout: float, factory: Callable[..., Any] | None = None):
    """An OpenAI client without client retries (every error is an outcome the gates must see)."""
    if factory:
        return factory(timeout=timeout)
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)


class AliasTraffic:
    """``clients`` threads, each sending the canary rows in turn to ``<base>:<alias>`` until
    ``stop``: alias requests as users send them, so the router splits them by the candidate's
    weight and the SLO window of an app without users has requests to judge."""

    def __init__(self, base_url: str, base_model: str, alias: str, rows: Sequence[dict[str, str]], *,
                 clients: int, max_tokens: int, api_key: str | None = None, timeout_s: float = 120.0,
                 client_factory: Callable[..., Any] | None = None, keep_failures: int = 5,
                 failure_pause_s: float = 1.0):
        if clients < 1 or not rows:
            raise ValueError(f"synthetic traffic needs clients >= 1 and canary rows (got {clients}, {len(rows)})")
        self.base_url, self.api_key = base_url.rstrip("/"), api_key or "not-needed"
        self.model = f"{base_model}:{alias}"
        self.rows, self.clients, self.max_tokens = list(rows), clients, max_tokens
        self.timeout_s, self.keep_failures, self.failure_pause_s = timeout_s, keep_failures, failure_pause_s
        self._factory = client_factory
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ok = self._failed = 0
        self._failures: list[str] = []

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("synthetic traffic is already running")
        self._stop.clear()
        self._ok = self._failed = 0
        self._failures = []
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"canary-traffic-{i}", daemon=True)
                         for i in range(self.clients)]
        for thread in self._threads:
            thread.start()

    def _loop(self, first: int) -> None:
        client = openai_client(self.base_url, self.api_key, self.timeout_s, self._factory)
        i = first
        while not self._stop.is_set():
            row = self.rows[i % len(self.rows)]
            i += self.clients
            try:
                client.chat.completions.create(model=self.model, messages=chat_messages(row),
                                               max_tokens=self.max_tokens, temperature=0.0)
                with self._lock:
                    self._ok += 1
            except Exception as exc:  # noqa: BLE001  counted; the app's metrics carry it to the gate
                with self._lock:
                    self._failed += 1
                    if len(self._failures) < self.keep_failures:
                        self._failures.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                # an app that refuses at once (down, restarting) is not hammered in a loop
                self._stop.wait(self.failure_pause_s)

    def stop(self) -> dict[str, Any]:
        """Stop sending; waits (at most one request's timeout) for the requests in flight."""
        self._stop.set()
        deadline = time.monotonic() + self.timeout_s + 5.0
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.0))
        stuck = sum(thread.is_alive() for thread in self._threads)
        self._threads = []
        with self._lock:
            return {"clients": self.clients, "requests": self._ok + self._failed, "ok": self._ok,
                    "failed": self._failed, "failures": list(self._failures), "still_running": stuck}


def _timed_out(exc: BaseException) -> bool:
    """Whether a probe failed by running past its deadline rather than by an answer."""
    from openai import APITimeoutError

    return isinstance(exc, (TimeoutError, APITimeoutError))


# ---------------------------------------------------------------------------------------
# Preflight


class HttpPreflight:
    """``POST {base_url}/-/preflight`` on the ingress, with the OpenAI API's auth header.

    Request: ``{"version", "messages" (the canary row as chat), "max_tokens", "deadline_s"}``.
    Answer 200: ``{"ok", "reason", "replicas": [{"replica", "ok", "reason", "latency_s"}]}``;
    4xx/5xx carry the OpenAI error object. Any failure to get an answer (connection refused, a
    timeout, an error status, a body that is not the contract) is ``ok=False`` with the reason,
    never an exception: a check that cannot run rejects the candidate.
    """

    PATH = "/-/preflight"

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 post: Callable[[str, bytes, dict[str, str], float], tuple[int, bytes]] | None = None):
        self.url = app_root(base_url) + self.PATH
        self.api_key = api_key
        self.post = post or _post

    def check(self, version: str, row: dict[str, str], deadline_s: float, max_tokens: int) -> PreflightResult:
        body = {"version": version, "messages": chat_messages(row), "max_tokens": max_tokens,
                "deadline_s": deadline_s}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"POST {self.url}"
        try:
            # The endpoint has deadline_s for its replicas; allow it a little more to answer.
            status, raw = self.post(self.url, json.dumps(body).encode(), headers, deadline_s + 15.0)
        except Exception as exc:  # noqa: BLE001  unreachable: a rejection with the reason
            return PreflightResult(False, f"{where}: no answer ({type(exc).__name__}: {str(exc)[:200]})")
        try:
            data = json.loads(raw.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if status != 200:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else raw[:200].decode("utf-8", "replace")
            return PreflightResult(False, f"{where}: HTTP {status}: {message}")
        if not isinstance(data, dict) or not isinstance(data.get("ok"), bool) \
                or not isinstance(data.get("replicas", []), list):
            return PreflightResult(False, f"{where}: answer is not a preflight result: {raw[:200]!r}")
        replicas = [r for r in data.get("replicas", []) if isinstance(r, dict)]
        return PreflightResult(data["ok"], data.get("reason"), replicas)


def _post(url: str, data: bytes, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """POST; (status, body) for any HTTP answer, an exception only when there is none."""
    import urllib.error

    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def app_root(base_url: str) -> str:
    """The app's root from its OpenAI base URL (``http://h:8000/v1`` -> ``http://h:8000``)."""
    base = base_url.rstrip("/")
    return base.removesuffix("/v1")


# ---------------------------------------------------------------------------------------
# Metrics


def _le(value: str) -> float:
    return math.inf if value in ("+Inf", "Inf", "inf") else float(value)


def add_sample(stats: VersionStats, name: str, labels: dict[str, str], value: float,
               count_client_errors: bool = True) -> None:
    """Fold one sample of the ingress metrics into ``stats``: requests (and errors, by status),
    or a latency bucket (``le``, ``+Inf`` included). Both SLO gates aggregate with it."""
    if name == REQUESTS:
        stats.requests += value
        if is_error(labels.get("status", ""), count_client_errors):
            stats.errors += value
    elif name == LATENCY_BUCKET:
        le = _le(labels["le"])
        stats.buckets[le] = stats.buckets.get(le, 0.0) + value


def stats_from_samples(samples: Sequence[tuple[str, dict[str, str], float]], alias: str | None,
                       count_client_errors: bool = True) -> dict[str, VersionStats]:
    """Per-version cumulative counters from Prometheus samples ``(name, labels, value)``.

    ``alias``: count only requests routed through that alias (None: every request labelled
    with a version, explicit ones included). Other labels (model, stream, node, pod) are summed.
    """
    out: dict[str, VersionStats] = {}
    for name, labels, value in samples:
        version = labels.get("version", "")
        if not version or (alias is not None and labels.get("alias") != alias):
            continue
        add_sample(out.setdefault(version, VersionStats()), name, labels, value, count_client_errors)
    return out


def parse_exposition(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of the two ingress metric families from Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = (REQUESTS, LATENCY_BUCKET)
    samples = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                samples.append((sample.name, dict(sample.labels), float(sample.value)))
    return samples


def fetch_text(url: str, timeout: float) -> str:
    """GET ``url`` as text (a metrics endpoint, a Prometheus query)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8")


class ScrapeMetrics:
    """Scrapes one or more Prometheus endpoints (Ray's metrics export port) and sums them."""

    def __init__(self, urls: Sequence[str], alias: str | None, *, count_client_errors: bool = True,
                 timeout: float = 10.0, fetch: Callable[[str, float], str] = fetch_text):
        if not urls:
            raise ValueError("no metrics URL to scrape")
        self.urls = list(urls)
        self.alias = alias
        self.count_client_errors = count_client_errors
        self.timeout = timeout
        self.fetch = fetch

    def snapshot(self) -> dict[str, VersionStats]:
        samples = []
        for url in self.urls:
            samples.extend(parse_exposition(self.fetch(url, self.timeout)))
        return stats_from_samples(samples, self.alias, self.count_client_errors)


class PrometheusQueryMetrics:
    """Reads the same counters through a Prometheus server's HTTP API (``/api/v1/query``)."""

    def __init__(self, url: str, alias: str | None, *, count_client_errors: bool = True, timeout: float = 10.0,
                 fetch: Callable[[str, float], str] = fetch_text):
        self.url = url.rstrip("/")
        self.alias = alias
        self.count_client_errors = count_client_errors
        self.timeout = timeout
        self.fetch = fetch

    def _query(self, expr: str) -> list[dict[str, Any]]:
        body = json.loads(self.fetch(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                                     self.timeout))
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {body.get('error', body)}")
        return body["data"]["result"]

    def snapshot(self) -> dict[str, VersionStats]:
        selector = f'{{alias="{self.alias}"}}' if self.alias is not None else '{version!=""}'
        samples = []
        for name, by in ((REQUESTS, "version, alias, status"), (LATENCY_BUCKET, "version, alias, le")):
            for item in self._query(f"sum by ({by}) ({name}{selector})"):
                samples.append((name, item["metric"], float(item["value"][1])))
        return stats_from_samples(samples, self.alias, self.count_client_errors)


# ---------------------------------------------------------------------------------------
# Wiring for the CLI (e2e-llm canary / promote / rollback)


def rollout_log_uri(store, alias: str) -> str:
    """``<adapter store>/rollouts-<alias>.jsonl``: beside the adapters, not a sub-folder (Ray
    Serve LLM would list a folder as an adapter)."""
    from e2e_llm import storage

    return storage.join(store.uri, f"rollouts-{alias}.jsonl")


def default_base_url(config) -> str:
    serve = config.serve
    return config.canary.base_url or f"http://{serve.host}:{serve.port}{serve.route_prefix.rstrip('/')}/v1"


def metrics_source(config, policy, *, metrics_urls: Sequence[str] = (), prometheus_url: str | None = None):
    """The SLO gate's metrics: CLI flags, else the profile's ``canary`` section, else Ray's
    metrics port on the serving host (``serve.metrics_export_port``)."""
    from e2e_llm.config import ConfigError

    alias = policy.alias if policy.slo.traffic == "alias" else None
    kw = {"count_client_errors": policy.slo.count_client_errors}
    prometheus_url = prometheus_url or (None if metrics_urls else config.canary.prometheus_url)
    if prometheus_url:
        return PrometheusQueryMetrics(prometheus_url, alias, **kw)
    urls = list(metrics_urls) or list(config.canary.metrics_urls)
    if not urls and config.serve.metrics_export_port:
        urls = [f"http://{config.serve.host}:{config.serve.metrics_export_port}/metrics"]
    if not urls:
        raise ConfigError(f"{config.source_file}: no metrics source for the SLO gate: set canary.prometheus_url, "
                          "canary.metrics_urls or serve.metrics_export_port (or pass --metrics-url)")
    return ScrapeMetrics(urls, alias, **kw)


def open_controller(config, *, policy_path: str | None = None, alias: str | None = None,
                    base_url: str | None = None, metrics_urls: Sequence[str] = (), prometheus_url: str | None = None,
                    on_resume: str | None = None, for_gates: bool = True, synthetic_clients: int | None = None,
                    out=print):
    """A :class:`~e2e_llm.canary.Controller` on the profile's adapter store and serving app.
    ``for_gates=False`` (promote, rollback) needs neither the app nor its metrics;
    ``synthetic_clients`` overrides the profile's ``canary.synthetic_traffic.clients``."""
    import os

    from e2e_llm.canary import Controller, RolloutLog, load_canary_set, load_policy
    from e2e_llm.store import AdapterStore

    policy = load_policy(config.path(policy_path or config.canary.policy))
    updates = {k: v for k, v in (("alias", alias), ("on_resume", on_resume)) if v}
    if updates:
        policy = policy.model_copy(update=updates)
    store = AdapterStore.from_config(config)
    store.require_reachable()
    task = config.task_schema()
    rows: list[dict[str, str]] = []  # a rollback or a promotion scores nothing: a broken set must not stop it
    prober = metrics = preflight = traffic = None
    if for_gates:
        rows = load_canary_set(policy, config.root, config.data.system_prompt, task)
        api_key = os.environ.get(config.serve.auth.api_key_env) if config.serve.auth.enabled else None
        url = base_url or default_base_url(config)
        prober = OpenAIProber(url, config.model.id, api_key=api_key, output_regex=task.output_regex())
        preflight = HttpPreflight(url, api_key=api_key)
        metrics = metrics_source(config, policy, metrics_urls=metrics_urls, prometheus_url=prometheus_url)
        synthetic = config.canary.synthetic_traffic
        clients = synthetic.clients if synthetic_clients is None else synthetic_clients
        if clients:
            traffic = AliasTraffic(url, config.model.id, policy.alias, rows, clients=clients,
                                   max_tokens=synthetic.max_tokens, api_key=api_key)
    log = RolloutLog(rollout_log_uri(store, policy.alias), store.storage_kw)
    controller = Controller(policy=policy, task=task, canary_rows=rows, log=log, router=StoreRouter(store),
                            prober=prober, metrics=metrics, out=out, preflight=preflight, traffic=traffic)
    return controller, store


def instruction_mismatch(store, candidate: str, rows: Sequence[dict[str, str]], task) -> str | None:
    """Why the canary set would not score ``candidate`` as it answers: it was trained on rows asking
    with another instruction than the set's rows ask with (:func:`e2e_llm.data.asked_otherwise`;
    the set asks as the profile's clients do), so its quality gate would roll it back for the
    question it is asked, not for its answers. None when they agree or either side is unknown."""
    from e2e_llm.data import ASKED_OTHERWISE, asked_otherwise, quoted

    found = asked_otherwise(store.manifest(candidate), list(rows), task.default_instruction())
    if found is None:
        return None
    trained, asked = found
    return (f"{candidate} was trained on rows asking with the instruction {quoted(trained)}, and every row of the "
            f"canary set asks with {quoted(asked)}: {ASKED_OTHERWISE}, so the quality gate would judge the "
            "question, not the adapter. Roll out an adapter trained with the instruction the set (and the "
            "profile's data.system_prompt) asks with, or pass --any-instruction to gate it on these rows anyway")


def resolve_candidate(config, store, ref: str) -> tuple[str, bool]:
    """(adapter id, newly published) for ``--adapter``: a published id or ``<name>:latest``; or a
    trained adapter (folder, run id, ``latest``) published on first use (a rerun with the same
    folder or run finds the version published before); bare ``latest`` with no training runs is
    the newest published version."""
    from e2e_llm.publish import publish_once
    from e2e_llm.store import StoreError, find_training_adapter

    name = config.data.dataset
    index = store.index()
    if ref in index:
        return ref, False
    if ref.endswith(":latest"):
        return store.latest(ref.removesuffix(":latest")), False
    if ref in store.aliases():
        raise StoreError(f"{ref!r} is an alias; name the version to roll out (published: {sorted(index)})")
    try:
        adapter_dir, manifest = find_training_adapter(config, ref)
    except StoreError:
        if ref == "latest":
            return store.latest(name), False
        raise
    return publish_once(config, store, adapter_dir, manifest, name)
