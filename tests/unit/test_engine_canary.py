# SPDX-License-Identifier: Apache-2.0
"""Engine/infrastructure canary, offline: the Anyscale rollout through the SDK on its fake
client, the KubeRay incremental upgrade through recorded kubectl/make commands, the SLO gate
over per-cluster metrics, and the rendered RayService/PodMonitor fields the gate relies on."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from e2e_llm.canary import Controller, RolloutLog, load_policy
from e2e_llm.canary_io import LATENCY_BUCKET, REQUESTS
from e2e_llm.engine_canary import (
    CANARY,
    AnyscalePlatform,
    GroupedMetrics,
    KubeRayPlatform,
    PlatformPreflight,
    PlatformRouter,
    PlatformStatus,
    engine_policy,
    open_engine_controller,
    platform_steps,
    prometheus_samples,
)
from e2e_llm.rollout_wait import wait_until

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "e2e-llm-prod"


class Clock:
    def __init__(self):
        self.t = 5_000.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += max(s, 0)


class Traffic:
    """Cumulative per-cluster samples: ``rate`` req/s split by the platform's canary percent."""

    def __init__(self, platform, clock, *, canary_errors=0.0, rate=4.0):
        self.platform, self.clock, self.rate, self.canary_errors = platform, clock, rate, canary_errors
        self.counts: dict[tuple[str, str], float] = {}
        self.last = clock.now()

    def samples(self):
        elapsed, self.last = self.clock.now() - self.last, self.clock.now()
        status = self.platform.status()
        share = status.canary_percent / 100 if status.canary else 0.0
        for group, n, err in ((status.primary, elapsed * self.rate * (1 - share), 0.0),
                              (status.canary, elapsed * self.rate * share, self.canary_errors)):
            if group:
                self.counts[(group, "200")] = self.counts.get((group, "200"), 0) + n * (1 - err)
                self.counts[(group, "500")] = self.counts.get((group, "500"), 0) + n * err
        label = self.platform.group_label
        out = [(REQUESTS, {label: g, "status": s}, v) for (g, s), v in self.counts.items()]
        for group in {g for g, _ in self.counts}:
            total = sum(v for (g, _), v in self.counts.items() if g == group)
            out += [(LATENCY_BUCKET, {label: group, "le": "1.0"}, total), (LATENCY_BUCKET, {label: group, "le": "+Inf"},
                                                                           total)]
        return out


@pytest.fixture
def policy():
    base = load_policy(ROOT / "configs/canary.yaml")
    return base.model_copy(update={"alias": f"{SERVICE}-test", "steps": [10, 50, 100], "step_window_s": 60.0,
                                   "slo": base.slo.model_copy(update={"min_requests": 5})})


def _fast_wait(clock):
    return lambda check: wait_until(check, timeout_s=600, poll_s=30, clock=clock.now, sleep=clock.sleep,
                                    out=lambda s: None)


def controller(tmp_path, policy, platform, traffic, clock) -> Controller:
    """The controller as `open_engine_controller` wires it (its policy rules, its preflight)."""
    policy = engine_policy(policy, "anyscale" if isinstance(platform, AnyscalePlatform) else "k8s")
    preflight = PlatformPreflight(platform) if policy.preflight.enabled else None
    return Controller(policy=policy, task=None, canary_rows=[], log=RolloutLog(str(tmp_path / "log.jsonl")),
                      router=PlatformRouter(platform), prober=None, metrics=GroupedMetrics(platform, traffic.samples),
                      clock=clock, out=lambda s: None, preflight=preflight)


# -- Anyscale through the SDK's fake client -------------------------------------------------


@pytest.fixture
def anyscale_fake():
    """The SDK's FakeAnyscaleClient, taught what the real backend does with canary_percent:
    a rollout of a new version onto a running service keeps the old one as primary until 100."""
    from anyscale.service import ServiceSDK
    from anyscale_fake import CanaryFake

    fake = CanaryFake()
    sdk = ServiceSDK(client=fake)
    from anyscale.service.models import ServiceConfig

    running = ServiceConfig.from_yaml(str(ROOT / "services/llm.yaml")).options(name=SERVICE, env_vars={"REV": "old"})
    sdk.deploy(running)  # the service as it runs today
    fake.rollouts.clear()
    return fake, sdk


def test_anyscale_engine_canary_steps_canary_percent_and_completes(tmp_path, policy, anyscale_fake):
    fake, sdk = anyscale_fake
    clock = Clock()
    platform = AnyscalePlatform(ROOT / "services/llm.yaml", SERVICE, sdk=sdk, wait=_fast_wait(clock))
    before = platform.status()
    traffic = Traffic(platform, clock)
    # Anyscale finishes (and drops the old version) at 100%: the gated steps stop below it.
    policy = policy.model_copy(update={"steps": platform_steps(policy.steps, "anyscale")})
    assert policy.steps == [10, 50]
    outcome = controller(tmp_path, policy, platform, traffic, clock).run(CANARY)
    assert outcome.result == "promoted"
    # 0: the preflight (the new version up and healthy before any traffic), then the steps
    assert fake.rollouts == [0, 10, 50, 100]
    assert fake.rollbacks == []
    after = platform.status()
    assert after.canary is None and after.primary != before.primary
    # the rollout went through the rendered service config
    assert fake.rolled_out_model.name == SERVICE


def test_anyscale_engine_canary_with_errors_is_rolled_back_through_the_sdk(tmp_path, policy, anyscale_fake):
    fake, sdk = anyscale_fake
    clock = Clock()
    platform = AnyscalePlatform(ROOT / "services/llm.yaml", SERVICE, sdk=sdk, wait=_fast_wait(clock))
    primary = platform.status().primary
    traffic = Traffic(platform, clock, canary_errors=0.2)
    ctl = controller(tmp_path, policy, platform, traffic, clock)
    outcome = ctl.run(CANARY)
    assert outcome.result == "rolled_back"
    assert fake.rollouts == [0, 10]
    assert fake.rollbacks == [sdk.status(name=SERVICE).id]
    assert fake.rolled_back_service == (sdk.status(name=SERVICE).id, None)
    assert platform.status() == PlatformStatus(primary, None, 0.0)
    gate = next(r for r in RolloutLog(str(tmp_path / "log.jsonl")).read() if r["event"] == "gate")
    assert [g["gate"] for g in gate["results"]] == ["slo"]  # no quality gate for a platform canary
    # 20% errors against an allowed 2%: the window ends at its first scrape, not after 60 s
    assert "error budget spent after 15s of the 60s window" in gate["reason"]
    assert gate["results"][0]["details"]["ended_early"] is True


# -- KubeRay incremental upgrade --------------------------------------------------------------


class FakeKube:
    """Records kubectl commands (git runs for real); the RayService status follows them (the
    operator steps 10%/window). ``applied`` keeps each applied overlay's kustomization.yaml."""

    def __init__(self):
        self.commands: list[list[str]] = []
        self.pending: str | None = None
        self.active = "e2e-llm-aaaaa"
        self.percent = 0
        self.applied: list[str] = []

    def run(self, cmd):
        if cmd[0] == "git":
            return subprocess.run(cmd, check=True, capture_output=True, text=True)
        self.commands.append(cmd)
        if cmd[:2] == ["kubectl", "get"]:
            if self.pending and self.percent >= 100:  # the operator promotes the pending cluster
                self.active, self.pending = self.pending, None
            active = {"rayClusterName": self.active, "trafficRoutedPercent": 100 - self.percent,
                      "applicationStatuses": {"llm": {"status": "RUNNING"}}}
            upgrading = "True" if self.pending else "False"
            status = {"activeServiceStatus": active, "conditions": [
                {"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints"},
                {"type": "UpgradeInProgress", "status": upgrading}]}
            if self.pending:
                status["pendingServiceStatus"] = {"rayClusterName": self.pending, "trafficRoutedPercent": self.percent}
            return subprocess.CompletedProcess(cmd, 0, json.dumps({"status": status}), "")
        if cmd[1] == "apply":
            overlay = Path(cmd[cmd.index("-k") + 1])
            self.applied.append((overlay / "kustomization.yaml").read_text())
            if "serve)" in cmd[-1] and "shared" not in cmd[-1]:  # the rollback applies only the serve component
                self.pending, self.percent = None, 0
            else:
                self.pending, self.percent = "e2e-llm-bbbbb", 10
        return subprocess.CompletedProcess(cmd, 0, "", "")


def applies(kube: FakeKube) -> list[list[str]]:
    return [c for c in kube.commands if c[1] == "apply"]


def test_kuberay_canary_applies_once_and_rolls_back_to_the_previous_revision(tmp_path, policy):
    kube = FakeKube()
    platform = KubeRayPlatform(name="e2e-llm", namespace=SERVICE, env="prod", rev="HEAD", root=ROOT, run=kube.run,
                               kubectl="kubectl")
    clock = Clock()
    traffic = Traffic(platform, clock, canary_errors=0.5)
    outcome = controller(tmp_path, policy, platform, traffic, clock).run(CANARY)
    assert outcome.result == "rolled_back"
    deploy, rollback = applies(kube)
    label = "app.kubernetes.io/component in"
    assert deploy == ["kubectl", "apply", "--server-side", "-k", str(ROOT / "k8s/overlays/prod"), "-l",
                      f"{label} (shared,serve,monitoring)"]
    assert rollback[:4] == ["kubectl", "apply", "--server-side", "-k"] and rollback[-2:] == ["-l", f"{label} (serve)"]
    # the rollback applied the manifests committed at REV, extracted from git (not the working tree)
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:k8s/overlays/prod/kustomization.yaml"],
                               capture_output=True, text=True, check=True).stdout
    assert rollback[4].endswith("k8s/overlays/prod") and kube.applied[1] == committed
    assert ["kubectl", "get", "rayservice", "e2e-llm", "-n", SERVICE, "-o", "json"] in kube.commands


def test_a_rollback_to_an_unknown_revision_fails_before_applying_anything(tmp_path):
    from e2e_llm.kuberay import rollback_service

    kube = FakeKube()
    with pytest.raises(subprocess.CalledProcessError):
        rollback_service(ROOT, "prod", "no-such-revision-xyz", run=kube.run)
    assert applies(kube) == []


def test_kuberay_healthy_upgrade_is_left_to_the_operator(tmp_path, policy):
    kube = FakeKube()
    clock = Clock()

    def operator_timer(s):  # while the promotion is waited on, the operator keeps stepping
        clock.sleep(s)
        kube.percent = min(100, kube.percent + 40)

    platform = KubeRayPlatform(name="e2e-llm", namespace=SERVICE, run=kube.run, kubectl="kubectl",
                               wait=lambda check: wait_until(check, timeout_s=600, poll_s=60, clock=clock.now,
                                                             sleep=operator_timer, out=lambda s: None))
    policy = policy.model_copy(update={"steps": platform_steps(policy.steps, "k8s")})

    def operator_steps():  # the operator moves 10% -> 50% -> 90% on its own timer during the gates
        kube.percent = min(90, kube.percent + 40) if kube.pending else 0
        return traffic_samples()

    traffic = Traffic(platform, clock)
    traffic_samples = traffic.samples
    traffic.samples = operator_steps
    outcome = controller(tmp_path, policy, platform, traffic, clock).run(CANARY)
    assert outcome.result == "promoted"
    assert [c[-1] for c in applies(kube)] == ["app.kubernetes.io/component in (shared,serve,monitoring)"]
    assert kube.active == "e2e-llm-bbbbb" and kube.pending is None  # promotion waited for the operator's end


def test_make_rollback_for_k8s_reapplies_the_previous_revision():
    """The command the gate runs on failure: what `make rollback TARGET=k8s` executes."""
    result = subprocess.run(["make", "-n", "rollback", "TARGET=k8s", "DEPLOY_ENV=prod", "REV=abc123"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "git archive abc123 k8s" in result.stdout
    assert "apply --server-side -k .cache/rollback/k8s/overlays/prod" in result.stdout
    anyscale = subprocess.run(["make", "-n", "rollback", "TARGET=anyscale", "DEPLOY_ENV=prod"], cwd=ROOT,
                              capture_output=True, text=True, check=False)
    assert f"service rollback -n {SERVICE}" in anyscale.stdout


def test_rendered_rayservice_upgrades_incrementally_and_pods_carry_the_gate_label():
    docs = {}
    for rel in ("k8s/components/canary/upgrade-strategy.yaml", "k8s/components/monitoring/podmonitor.yaml"):
        docs[rel] = yaml.safe_load((ROOT / rel).read_text())
    spec = docs["k8s/components/canary/upgrade-strategy.yaml"]["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
    options = spec["upgradeStrategy"]["clusterUpgradeOptions"]
    assert 0 < options["stepSizePercent"] <= options["maxSurgePercent"]
    assert options["intervalSeconds"] > 0 and options["gatewayClassName"]
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    relabel = docs["k8s/components/monitoring/podmonitor.yaml"]["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
            "targetLabel": KubeRayPlatform.group_label} in relabel
    prod = (ROOT / "k8s/overlays/prod/kustomization.yaml").read_text()
    assert "../../components/canary" in prod


def test_per_cluster_metrics_come_from_the_prometheus_query_api():
    def fetch(url, timeout):
        assert "sum+by+%28ray_io_cluster" in url
        metric = {"ray_io_cluster": "c1", **({"status": "200"} if "requests" in url else {"le": "+Inf"})}
        return json.dumps({"status": "success", "data": {"result": [{"metric": metric, "value": [0, "7"]}]}})

    class P:
        group_label = "ray_io_cluster"

        def status(self):
            return PlatformStatus("c1", None, 0.0)

    stats = GroupedMetrics(P(), prometheus_samples("http://prom:9090", "ray_io_cluster", fetch)).snapshot()
    assert stats["primary"].requests == 7 and stats["primary"].buckets == {math.inf: 7.0}


def test_engine_controller_from_the_cluster_profile(tmp_path, project_root):
    from e2e_llm.config import load_profile

    config = load_profile("cluster", root=project_root)
    config.storage.adapters = str(tmp_path / "store")
    kube = FakeKube()
    ctl = open_engine_controller(config, platform="k8s", env="prod",
                                 platform_impl=KubeRayPlatform(name="e2e-llm", namespace=SERVICE, run=kube.run,
                                                                kubectl="kubectl"))
    assert ctl.policy.alias == "e2e-llm-prod-k8s"
    assert ctl.log.uri.endswith("rollouts-e2e-llm-prod-k8s.jsonl")
    assert ctl.prober is None


@pytest.mark.parametrize("inf", ["+Inf", "Inf", "inf"])
def test_both_slo_gates_aggregate_samples_the_same_way(inf):
    """Per version (adapter canary) or per cluster (engine canary): the same sums, every spelling of +Inf."""
    from e2e_llm.canary_io import stats_from_samples

    class P:
        group_label = "ray_io_cluster"

        def status(self):
            return PlatformStatus("c1", "c2", 10.0)

    samples = [(REQUESTS, {"version": "v2", "ray_io_cluster": "c2", "alias": "a", "status": "200"}, 5.0),
               (REQUESTS, {"version": "v2", "ray_io_cluster": "c2", "alias": "a", "status": "500"}, 2.0),
               (REQUESTS, {"version": "v2", "ray_io_cluster": "c2", "alias": "a", "status": "401"}, 4.0),
               (LATENCY_BUCKET, {"version": "v2", "ray_io_cluster": "c2", "alias": "a", "le": "0.5"}, 3.0),
               (LATENCY_BUCKET, {"version": "v2", "ray_io_cluster": "c2", "alias": "a", "le": inf}, 11.0)]
    by_version = stats_from_samples(samples, "a")["v2"]
    by_cluster = GroupedMetrics(P(), lambda: samples).snapshot()["canary"]
    for stats in (by_version, by_cluster):
        assert (stats.requests, stats.errors) == (11.0, 2.0)  # 401 says nothing about the version
        assert stats.buckets == {0.5: 3.0, math.inf: 11.0}
