# SPDX-License-Identifier: Apache-2.0
"""The canary controller's real connections, offline: alias records in a local adapter store,
OpenAI probes through a fake client, Prometheus text and query API parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from serving import wait_until

from e2e_llm.canary import AliasState, load_canary_set, load_policy
from e2e_llm.canary_io import (
    AliasTraffic,
    OpenAIProber,
    PrometheusQueryMetrics,
    ScrapeMetrics,
    StoreRouter,
    is_error,
    metrics_source,
    resolve_candidate,
    rollout_log_uri,
)
from e2e_llm.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# What Ray's metrics port serves for the ingress counters (labels as Ray 2.60 exports them).
RAY = 'Component="core_worker",SessionName="s1",Version="2.60.0"'
REQ = "ray_e2e_llm_requests_total"
LAT = "ray_e2e_llm_request_latency_seconds"


def _line(name: str, value: float, **labels: str) -> str:
    return name + "{" + ",".join([RAY, *(f'{k}="{v}"' for k, v in labels.items())]) + "}" + f" {value}"


EXPOSITION = "\n".join([
    f"# HELP {REQ} Requests by model, alias, adapter version and HTTP status.",
    f"# TYPE {REQ} counter",
    _line(REQ, 90.0, WorkerId="a", alias="viggo", model="m", status="200", version="viggo-v1"),
    _line(REQ, 10.0, WorkerId="b", alias="viggo", model="m", status="200", version="viggo-v1"),
    _line(REQ, 3.0, WorkerId="a", alias="viggo", model="m", status="500", version="viggo-v2"),
    _line(REQ, 7.0, WorkerId="a", alias="viggo", model="m", status="200", version="viggo-v2"),
    _line(REQ, 8.0, WorkerId="a", alias="", model="m", status="404", version="viggo-v2"),
    _line(REQ, 5.0, WorkerId="a", alias="", model="m", status="200", version=""),
    f"# HELP {LAT} End-to-end request latency.",
    f"# TYPE {LAT} histogram",
    _line(f"{LAT}_bucket", 40.0, WorkerId="a", alias="viggo", le="0.5", stream="false", version="viggo-v1"),
    _line(f"{LAT}_bucket", 90.0, WorkerId="a", alias="viggo", le="1.0", stream="false", version="viggo-v1"),
    _line(f"{LAT}_bucket", 100.0, WorkerId="a", alias="viggo", le="+Inf", stream="false", version="viggo-v1"),
    _line(f"{LAT}_count", 100.0, WorkerId="a", alias="viggo", stream="false", version="viggo-v1"),
    _line(f"{LAT}_sum", 60.0, WorkerId="a", alias="viggo", stream="false", version="viggo-v1"),
    _line(f"{LAT}_bucket", 1.0, WorkerId="a", alias="viggo", le="0.5", stream="true", version="viggo-v2"),
    _line(f"{LAT}_bucket", 10.0, WorkerId="a", alias="viggo", le="1.0", stream="true", version="viggo-v2"),
    _line(f"{LAT}_bucket", 10.0, WorkerId="a", alias="viggo", le="+Inf", stream="true", version="viggo-v2"),
]) + "\n"


def test_scraped_exposition_is_summed_per_version_over_workers_and_filtered_by_alias():
    stats = ScrapeMetrics(["http://x/metrics"], "viggo", fetch=lambda url, timeout: EXPOSITION).snapshot()
    assert set(stats) == {"viggo-v1", "viggo-v2"}
    assert (stats["viggo-v1"].requests, stats["viggo-v1"].errors) == (100.0, 0.0)
    # the explicit 404 is not alias traffic
    assert (stats["viggo-v2"].requests, stats["viggo-v2"].errors) == (10.0, 3.0)
    assert stats["viggo-v1"].buckets == {0.5: 40.0, 1.0: 90.0, math.inf: 100.0}
    assert stats["viggo-v1"].quantile(0.95) == 1.0


def test_all_traffic_counts_explicit_version_calls_and_client_errors_are_configurable():
    everything = ScrapeMetrics(["u"], None, fetch=lambda url, timeout: EXPOSITION).snapshot()
    assert (everything["viggo-v2"].requests, everything["viggo-v2"].errors) == (18.0, 11.0)
    server_only = ScrapeMetrics(["u"], None, count_client_errors=False, fetch=lambda u, t: EXPOSITION).snapshot()
    assert server_only["viggo-v2"].errors == 3.0
    assert "" not in everything  # base-model requests have no version


def test_several_endpoints_are_added_up():
    stats = ScrapeMetrics(["a", "b"], "viggo", fetch=lambda url, timeout: EXPOSITION).snapshot()
    assert stats["viggo-v1"].requests == 200.0


@pytest.mark.parametrize("status,counted", [("200", False), ("500", True), ("503", True), ("404", True),
                                            ("400", True), ("401", False), ("429", False), ("", True),
                                            ("499", False)])  # the client left mid-stream
def test_which_statuses_are_errors(status, counted):
    assert is_error(status) is counted


def test_prometheus_query_api_gives_the_same_counters():
    seen = []

    def fetch(url, timeout):
        seen.append(url)
        if "requests_total" in url:
            result = [{"metric": {"version": "viggo-v1", "alias": "viggo", "status": "200"}, "value": [0, "40"]},
                      {"metric": {"version": "viggo-v1", "alias": "viggo", "status": "502"}, "value": [0, "2"]}]
        else:
            result = [{"metric": {"version": "viggo-v1", "alias": "viggo", "le": "1"}, "value": [0, "30"]},
                      {"metric": {"version": "viggo-v1", "alias": "viggo", "le": "+Inf"}, "value": [0, "42"]}]
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})

    stats = PrometheusQueryMetrics("http://prom:9090/", "viggo", fetch=fetch).snapshot()
    assert (stats["viggo-v1"].requests, stats["viggo-v1"].errors) == (42.0, 2.0)
    assert stats["viggo-v1"].buckets == {1.0: 30.0, math.inf: 42.0}
    assert seen[0].startswith("http://prom:9090/api/v1/query?query=sum+by")
    assert "alias%3D%22viggo%22" in seen[0]


def test_prometheus_errors_surface():
    def fetch(url, timeout):
        return json.dumps({"status": "error", "error": "bad query"})

    with pytest.raises(RuntimeError, match="bad query"):
        PrometheusQueryMetrics("http://prom", "viggo", fetch=fetch).snapshot()


class FakeCompletions:
    def __init__(self):
        self.calls = []

    def create(self, **kw):
        self.calls.append(kw)
        if "fail" in kw["messages"][1]["content"]:
            raise RuntimeError("Error code: 500 - adapter failed to load")
        if "slow" in kw["messages"][1]["content"]:
            import httpx
            from openai import APITimeoutError

            raise APITimeoutError(request=httpx.Request("POST", "http://app/v1/chat/completions"))

        class Msg:
            content = f" inform(name[{kw['messages'][1]['content']}]) \n"

        class Choice:
            message = Msg()

        class Response:
            def __init__(self):
                self.choices = [Choice()]

        return Response()


def test_openai_prober_sends_each_row_to_the_version_and_keeps_failures():
    completions = FakeCompletions()

    class Client:
        class chat:
            pass

    Client.chat.completions = completions
    prober = OpenAIProber("http://app/v1", "smollm2-135m", output_regex="inform\\(.*\\)",
                          client_factory=lambda timeout: Client)
    policy = load_policy(ROOT / "configs/canary.yaml")
    rows = [{"instruction": "sys", "input": "Halo", "output": "x"},
            {"instruction": "sys", "input": "fail", "output": "y"}]
    answers = prober.probe("viggo-v2", rows, policy.quality.model_copy(update={"structured_output": True}))
    assert answers[0].text == "inform(name[Halo])" and answers[0].error is None
    assert answers[1].text is None and "adapter failed to load" in answers[1].error
    call = completions.calls[0]
    assert call["model"] == "smollm2-135m:viggo-v2"
    assert call["temperature"] == 0.0 and call["max_tokens"] == policy.quality.max_tokens
    assert call["messages"][0] == {"role": "system", "content": "sys"}
    assert call["extra_body"] == {"structured_outputs": {"regex": "inform\\(.*\\)"}}
    prober.probe("viggo-v2", rows[:1], policy.quality.model_copy(update={"structured_output": False}))
    assert completions.calls[-1]["extra_body"] is None


def test_synthetic_traffic_calls_the_alias_from_each_client_in_turn_until_stopped():
    import threading

    completions = FakeCompletions()
    lock = threading.Lock()
    original = completions.create

    def create(**kw):  # the fake's call list is shared by the clients' threads
        with lock:
            return original(**kw)

    class Client:
        class chat:
            pass

    Client.chat.completions = type("C", (), {"create": staticmethod(create)})
    timeouts = []
    rows = [{"instruction": "sys", "input": name, "output": "x"} for name in ("Halo", "fail", "Doom")]
    traffic = AliasTraffic("http://app/v1", "smollm2-135m", "viggo", rows, clients=2, max_tokens=8,
                           client_factory=lambda timeout: timeouts.append(timeout) or Client, failure_pause_s=0.01)
    traffic.start()
    with pytest.raises(RuntimeError, match="already running"):
        traffic.start()
    wait_until(lambda: len(completions.calls) >= 12, 20, "12 synthetic requests", interval=0.01)
    sent = traffic.stop()
    calls = list(completions.calls)
    assert sent["requests"] == sent["ok"] + sent["failed"] == len(calls) and sent["still_running"] == 0
    assert {c["model"] for c in calls} == {"smollm2-135m:viggo"}  # the alias: the router splits them
    assert {c["max_tokens"] for c in calls} == {8} and {c["temperature"] for c in calls} == {0.0}
    assert {c["messages"][1]["content"] for c in calls} == {"Halo", "fail", "Doom"}
    assert sent["failed"] >= 2 and "adapter failed to load" in sent["failures"][0]  # counted, not retried
    assert len(sent["failures"]) <= 5 and timeouts == [120.0, 120.0]
    assert len(completions.calls) == len(calls)  # nothing is sent after stop
    traffic.start()  # the next window starts from zero
    wait_until(lambda: len(completions.calls) >= len(calls) + 2, 20, "the restarted clients' requests",
               interval=0.01)
    assert traffic.stop()["requests"] == len(completions.calls) - len(calls)


def test_synthetic_traffic_pauses_after_a_failure_and_stop_ends_the_pause():
    calls = []

    class Refused:
        class chat:
            class completions:
                @staticmethod
                def create(**kw):
                    calls.append(kw)
                    raise ConnectionError("connection refused")

    rows = [{"instruction": "sys", "input": "Halo", "output": "x"}]
    traffic = AliasTraffic("http://app/v1", "smollm2-135m", "viggo", rows, clients=2, max_tokens=8,
                           client_factory=lambda timeout: Refused, failure_pause_s=3600)
    traffic.start()
    wait_until(lambda: len(calls) >= 2, 20, "one refused request per client", interval=0.01)
    sent = traffic.stop()  # a pause that ignored the stop would outlast its join deadline
    assert sent["failed"] == sent["requests"] == len(calls) == 2 and sent["still_running"] == 0
    assert sent["failures"] == ["ConnectionError: connection refused"] * 2


def test_synthetic_traffic_comes_from_the_profile_unless_the_flag_says_otherwise(config):
    from e2e_llm.canary_io import open_controller

    config.storage.endpoint_url = None  # a store on disk: nothing to reach
    assert config.canary.synthetic_traffic.clients == 2  # the local profile: nobody else calls its app
    controller, _ = open_controller(config)
    assert isinstance(controller.traffic, AliasTraffic)
    assert (controller.traffic.clients, controller.traffic.model) == (2, f"{config.model.id}:viggo")
    assert len(controller.traffic.rows) == controller.policy.canary_set.rows
    assert open_controller(config, synthetic_clients=0)[0].traffic is None
    assert open_controller(config, synthetic_clients=3)[0].traffic.clients == 3
    assert open_controller(config, for_gates=False)[0].traffic is None


def test_a_rollback_or_promotion_does_not_need_a_valid_canary_set(config):
    """Rolling back in an emergency must not fail on the canary set (changed since the policy pinned
    it, or made for another task): only the gates score it."""
    from e2e_llm.canary_io import open_controller

    config.storage.endpoint_url = None
    config.data.system_prompt = "A prompt the set was not asked with."
    with pytest.raises(ConfigError, match="instruction is not the profile's data.system_prompt"):
        open_controller(config)
    controller, _ = open_controller(config, for_gates=False)
    assert controller.rows == []


def test_the_synthetic_clients_flag_takes_the_profile_settings_bounds(capsys):
    from e2e_llm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["canary", "--synthetic-clients", "0"]).synthetic_clients == 0
    assert parser.parse_args(["canary"]).synthetic_clients is None
    for bad in ("-1", "65", "two"):
        with pytest.raises(SystemExit):
            parser.parse_args(["canary", "--synthetic-clients", bad])
    assert "'65': Input should be less than or equal to 64" in capsys.readouterr().err


def test_openai_prober_uses_the_given_deadline_and_marks_timeouts():
    completions, timeouts = FakeCompletions(), []

    class Client:
        class chat:
            pass

    Client.chat.completions = completions

    def factory(timeout):
        timeouts.append(timeout)
        return Client

    prober = OpenAIProber("http://app/v1", "smollm2-135m", client_factory=factory)
    policy = load_policy(ROOT / "configs/canary.yaml")
    rows = [{"instruction": "sys", "input": "slow", "output": "x"},
            {"instruction": "sys", "input": "fail", "output": "y"}]
    slow, failed = prober.probe("viggo-v2", rows, policy.quality, 42.0)
    assert timeouts == [42.0]
    assert slow.text is None and slow.timed_out and "APITimeoutError" in slow.error
    assert failed.text is None and not failed.timed_out  # an answer (an error) is not retried


# -- the ingress preflight endpoint (HttpPreflight), against a real local HTTP server -------------


class PreflightServer:
    """A local HTTP server answering POST /-/preflight with ``status`` and ``body``; records requests."""

    def __init__(self, status: int, body: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.requests: list[tuple[str, dict, dict]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), data))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


ROW = {"instruction": "Turn the input into a meaning representation.", "input": "Halo is fun.", "output": "x"}


def test_preflight_posts_the_contract_with_auth_and_reads_every_replica():
    from e2e_llm.canary_io import HttpPreflight

    answer = {"ok": True, "reason": None, "replicas": [
        {"replica": "engine-a", "ok": True, "reason": None, "latency_s": 1.5},
        {"replica": "engine-b", "ok": True, "reason": None, "latency_s": 2.0}]}
    with PreflightServer(200, json.dumps(answer).encode()) as server:
        result = HttpPreflight(server.base_url, api_key="sekret").check("viggo-v2", ROW, 90.0, 8)
    assert result.ok and [r["replica"] for r in result.replicas] == ["engine-a", "engine-b"]
    path, headers, body = server.requests[0]
    assert path == "/-/preflight"  # beside /-/ready: the app root, not under /v1
    assert headers["Authorization"] == "Bearer sekret"
    assert body == {"version": "viggo-v2", "max_tokens": 8, "deadline_s": 90.0,
                    "messages": [{"role": "system", "content": ROW["instruction"]},
                                 {"role": "user", "content": ROW["input"]}]}


def test_preflight_failure_and_error_answers_are_rejections_with_the_reason():
    from e2e_llm.canary_gates import preflight_gate
    from e2e_llm.canary_io import HttpPreflight

    failed = {"ok": False, "reason": "1 of 2 engine replica(s) failed: engine-b: adapter viggo-v2 failed to load",
              "replicas": [{"replica": "engine-a", "ok": True, "reason": None, "latency_s": 1.0},
                           {"replica": "engine-b", "ok": False, "reason": "adapter viggo-v2 failed to load",
                            "latency_s": 0.2}]}
    with PreflightServer(200, json.dumps(failed).encode()) as server:
        result = HttpPreflight(server.base_url).check("viggo-v2", ROW, 90.0, 8)
    gate = preflight_gate(result)
    assert gate.status == "fail" and "engine-b: adapter viggo-v2 failed to load" in gate.reason
    assert [c.ok for c in gate.checks] == [True, False]
    error = {"error": {"message": "unknown adapter 'viggo-v9'", "type": "NotFoundError", "code": 404}}
    with PreflightServer(404, json.dumps(error).encode()) as server:
        result = HttpPreflight(server.base_url).check("viggo-v9", ROW, 90.0, 8)
    assert not result.ok and result.reason.endswith("HTTP 404: unknown adapter 'viggo-v9'")
    with PreflightServer(200, b"<html>proxy</html>") as server:
        result = HttpPreflight(server.base_url).check("viggo-v2", ROW, 90.0, 8)
    assert not result.ok and "not a preflight result" in result.reason


def test_preflight_against_nothing_listening_is_a_rejection_not_a_crash():
    from e2e_llm.canary_io import HttpPreflight
    from e2e_llm.ports import free_tcp_port

    port = free_tcp_port()  # free a moment ago: nothing listens there
    result = HttpPreflight(f"http://127.0.0.1:{port}/v1").check("viggo-v2", ROW, 5.0, 8)
    assert not result.ok
    assert result.reason.startswith(f"POST http://127.0.0.1:{port}/-/preflight: no answer (URLError")
    assert "refused" in result.reason.lower()


def _fake_adapter(path: Path, rank: int = 8) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": "smollm2-135m"}))
    (path / "adapter_model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # no tensors
    return path


@pytest.fixture
def store(tmp_path):
    from e2e_llm.store import AdapterStore

    store = AdapterStore(str(tmp_path / "store"))
    store.publish(_fake_adapter(tmp_path / "a1"), name="viggo", alias="viggo")
    store.publish(_fake_adapter(tmp_path / "a2"), name="viggo")
    return store


def test_store_router_writes_weights_as_fractions_and_reads_percent(store):
    router = StoreRouter(store)
    assert router.get("viggo") == AliasState("viggo-v1", None, 0.0)
    assert router.get("nope") is None
    router.set("viggo", AliasState("viggo-v1", "viggo-v2", 10.0))
    record = store.aliases()["viggo"]
    assert (record.candidate, record.candidate_weight) == ("viggo-v2", 0.1)
    assert router.get("viggo") == AliasState("viggo-v1", "viggo-v2", 10.0)
    router.set("viggo", AliasState("viggo-v2", None, 0.0))
    assert store.aliases()["viggo"].stable == "viggo-v2"


def test_store_router_sets_only_on_top_of_the_record_it_read(store):
    from e2e_llm.canary import RouterConflict

    router = StoreRouter(store)
    assert router.get("viggo") == AliasState("viggo-v1", None, 0.0)
    store.set_alias("viggo", stable="viggo-v2")  # someone else moves the alias in between
    with pytest.raises(RouterConflict, match="at revision 2, not 1"):
        router.set("viggo", AliasState("viggo-v1", "viggo-v2", 10.0))
    assert store.aliases()["viggo"].stable == "viggo-v2" and store.aliases()["viggo"].candidate is None
    router.get("viggo")
    router.set("viggo", AliasState("viggo-v2", "viggo-v1", 10.0))  # re-read: now it applies
    assert store.aliases()["viggo"].revision == 3


def test_rollout_log_sits_beside_the_adapters_and_is_not_listed_as_one(store):
    from e2e_llm import storage

    uri = rollout_log_uri(store, "viggo")
    storage.write_text(uri, "{}\n")
    assert uri.endswith("/rollouts-viggo.jsonl")
    assert sorted(store.adapter_ids()) == ["viggo-v1", "viggo-v2"]


def test_rollout_log_reaches_the_store_with_its_endpoint(monkeypatch):
    """The log must use the store's endpoint (the profile's S3 server), not the AWS default."""
    from e2e_llm import cas
    from e2e_llm.canary import RolloutLog
    from e2e_llm.store import AdapterStore

    store = AdapterStore("s3://bucket/adapters", endpoint_url="http://127.0.0.1:1", region="us-east-1")
    seen = []
    monkeypatch.setattr(cas, "read", lambda uri, **kw: seen.append(("read", kw)) or cas.Versioned(None, None))
    monkeypatch.setattr(cas, "write", lambda uri, data, expect, **kw: seen.append(("write", kw)) or "etag")
    log = RolloutLog(rollout_log_uri(store, "viggo"), store.storage_kw)
    assert log.read() == []
    log.append({"event": "start"})
    assert [op for op, _ in seen] == ["read", "write"]
    assert all(kw.get("endpoint_url") == store.storage_kw["endpoint_url"] for _, kw in seen), seen


def test_candidate_resolution_publishes_a_folder_once(store, tmp_path, local_config):
    folder = _fake_adapter(tmp_path / "trained")
    assert resolve_candidate(local_config, store, "viggo-v2") == ("viggo-v2", False)
    assert resolve_candidate(local_config, store, "viggo:latest") == ("viggo-v2", False)
    first = resolve_candidate(local_config, store, str(folder))
    assert first == ("viggo-v3", True)
    assert resolve_candidate(local_config, store, str(folder)) == ("viggo-v3", False)  # a rerun resumes, no v4
    with pytest.raises(Exception, match="is an alias"):
        resolve_candidate(local_config, store, "viggo")


def test_metrics_source_follows_flags_then_profile(local_config):
    policy = load_policy(ROOT / "configs/canary.yaml")
    default = metrics_source(local_config, policy)
    assert isinstance(default, ScrapeMetrics)
    assert default.urls == [f"http://127.0.0.1:{local_config.serve.metrics_export_port}/metrics"]
    assert default.alias == "viggo"
    assert metrics_source(local_config, policy, metrics_urls=["http://h:1/metrics"]).urls == ["http://h:1/metrics"]
    assert isinstance(metrics_source(local_config, policy, prometheus_url="http://p:9090"), PrometheusQueryMetrics)
    everything = policy.model_copy(update={"slo": policy.slo.model_copy(update={"traffic": "all"})})
    assert metrics_source(local_config, everything).alias is None


def test_cluster_profile_queries_prometheus(project_root):
    from e2e_llm.config import load_profile

    config = load_profile("cluster", root=project_root)
    assert config.canary.synthetic_traffic.clients == 0  # its gates judge the users' traffic
    policy = load_policy(ROOT / "configs/canary.yaml")
    assert isinstance(metrics_source(config, policy), PrometheusQueryMetrics)
    assert len(load_canary_set(policy, project_root)) == policy.canary_set.rows


def _make(*args: str):
    import subprocess

    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_make_canary_needs_adapter_and_rollback_target_adapter_is_adapter_level():
    missing = _make("canary")
    assert missing.returncode != 0 and "ADAPTER is required" in missing.stderr
    assert "e2e-llm canary --profile local --adapter viggo-v2" in _make("canary", "ADAPTER=viggo-v2").stdout
    rollback = _make("rollback", "TARGET=adapter")
    assert rollback.returncode == 0 and "e2e-llm rollback --profile local" in rollback.stdout
    assert "preflight" not in rollback.stdout  # no cloud credentials needed to move an alias back
    wrong = _make("train", "TARGET=adapter")
    assert wrong.returncode != 0 and "TARGET=adapter applies to make rollback only" in wrong.stderr
    assert "e2e-llm promote --profile local" in _make("promote").stdout


VIGGO_OWN = "Given a target sentence construct the underlying meaning representation of the input sentence."


def test_a_candidate_trained_with_another_instruction_than_the_canary_set_asks_is_refused(config, tmp_path,
                                                                                           monkeypatch, capsys):
    """A cluster-trained adapter (VIGGO's own instruction) rolled out where the set asks with the local
    prompt: the quality gate would roll it back for the question. Refused before any rollout record;
    --any-instruction rolls it out, its start record saying why."""
    from e2e_llm.canary import CanaryError, Controller
    from e2e_llm.cli import build_parser
    from e2e_llm.commands import canary as command
    from e2e_llm.store import AdapterStore

    config.storage.endpoint_url, config.storage.adapters = None, None  # a store on disk
    store = AdapterStore.from_config(config)
    asked = config.data.system_prompt
    store.publish(_fake_adapter(tmp_path / "stable"), name="viggo", alias="viggo",
                  manifest={"dataset": {"instruction": asked}})
    gpu = store.publish(_fake_adapter(tmp_path / "gpu"), name="viggo",
                        manifest={"run_id": "gpu-run", "dataset": {"instruction": VIGGO_OWN}})
    same = store.publish(_fake_adapter(tmp_path / "local"), name="viggo", manifest={"dataset": {"instruction": asked}})
    older = store.publish(_fake_adapter(tmp_path / "older"), name="viggo", manifest={})  # before dataset.instruction
    monkeypatch.setattr("e2e_llm.config.load_profile", lambda *args, **kw: config)
    started = []

    def run(self, candidate=None, **start_fields):  # where the rollout would begin: stop there, say what it got
        started.append((candidate, start_fields))
        raise CanaryError("stopped at the start")

    monkeypatch.setattr(Controller, "run", run)

    def canary(*flags):
        return command.run(build_parser().parse_args(["canary", "--profile", "local", *flags]))

    assert canary("--adapter", gpu) == command.Exit.ERROR
    err = capsys.readouterr().err
    assert f"{gpu} was trained on rows asking with the instruction 'Given a target sentence construct" in err
    assert f"every row of the canary set asks with {asked!r}" in err and "--any-instruction" in err
    assert started == [] and store.aliases()["viggo"].candidate is None

    for fine in (same, older):  # the same instruction, or a manifest that does not say
        assert canary("--adapter", fine) == command.Exit.ERROR and started.pop() == (fine, {})

    assert canary("--adapter", gpu, "--any-instruction") == command.Exit.ERROR
    candidate, fields = started.pop()
    assert candidate == gpu and "was trained on rows asking with" in fields["instruction_mismatch"]
    assert "warning (--any-instruction)" in capsys.readouterr().err
