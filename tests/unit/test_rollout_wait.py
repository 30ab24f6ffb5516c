# SPDX-License-Identifier: Apache-2.0
"""Rollouts are waited on to their real end, promoted or undone, offline: recorded RayService
status objects (tests/unit/recorded/), the Anyscale SDK's fake client, and the deploy path the
workflow runs (`e2e-llm canary --platform ...`), failure paths included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from e2e_llm.rollout_wait import RolloutStuck, anyscale_rollout, rayjob_run, rayservice_upgrade, wait_until

ROOT = Path(__file__).resolve().parents[2]
RECORDED = list(yaml.safe_load_all((Path(__file__).parent / "recorded/rayservice-upgrade.yaml").read_text()))
APPLIED, AT_10, AT_50, DONE, DEPLOY_FAILED, INIT_TIMEOUT = RECORDED
OLD, NEW = (f"ghcr.io/e2e-llm/e2e-llm-serve:2.60.0-py311-cu128-{c * 12}" for c in "ab")
IMAGES = {"e2e-llm-aaaaa": OLD, "e2e-llm-bbbbb": NEW}


class Clock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s


def _wait(observations, timeout_s=600.0):
    """wait_until over a sequence of status objects (the last one repeats), on a fake clock."""
    clock, seen, lines = Clock(), iter(observations), []
    last = {}

    def check():
        nonlocal last
        last = next(seen, last)
        return rayservice_upgrade(last, IMAGES.get, NEW)

    result = wait_until(check, timeout_s=timeout_s, poll_s=30, clock=clock.now, sleep=clock.sleep, out=lines.append)
    return result, lines, clock.t


def test_upgrade_is_done_only_when_the_new_cluster_is_active_and_no_upgrade_runs():
    result, lines, elapsed = _wait([APPLIED, AT_10, AT_50, DONE])
    assert result.done and "Ready on cluster e2e-llm-bbbbb" in result.detail
    assert "has not observed generation 2" in lines[0]
    assert "pending cluster e2e-llm-bbbbb at 10% traffic" in lines[1] and "at 50% traffic" in lines[2]
    assert elapsed == 90


def test_ready_alone_is_not_the_end_of_an_upgrade():
    """What `kubectl wait --for=condition=Ready` would accept during the upgrade."""
    ready = {c["type"]: c["status"] for c in AT_50["status"]["conditions"]}
    assert ready == {"Ready": "True", "UpgradeInProgress": "True"}
    assert not rayservice_upgrade(AT_50, IMAGES.get, NEW).done


def test_ready_on_the_old_image_is_not_done():
    observed = json.loads(json.dumps(APPLIED))
    observed["status"]["observedGeneration"] = 2  # operator saw the spec, but no upgrade happened
    check = rayservice_upgrade(observed, IMAGES.get, NEW)
    assert not check.done and not check.failed
    assert f"runs {OLD}, not {NEW}" in check.detail


@pytest.mark.parametrize("observation, message", [
    (DEPLOY_FAILED, "rollout failed: RayService e2e-llm-prod/e2e-llm: pending cluster e2e-llm-bbbbb: "
                    "applications llm DEPLOY_FAILED"),
    (INIT_TIMEOUT, "rollout failed: RayService e2e-llm-prod/e2e-llm: Ready is False, reason InitializingTimeout"),
])
def test_a_failed_upgrade_stops_the_wait_at_once_with_the_reason(observation, message):
    with pytest.raises(RolloutStuck, match=message.replace("(", r"\(")) as info:
        _wait([APPLIED, observation])
    assert "not finished" not in str(info.value)


def test_a_stuck_upgrade_times_out_with_the_last_status():
    with pytest.raises(RolloutStuck) as info:
        _wait([APPLIED, AT_10, AT_50], timeout_s=600)
    assert str(info.value).startswith("rollout not finished after 600s:")
    assert "pending cluster e2e-llm-bbbbb at 50% traffic" in str(info.value)


# -- RayJob ---------------------------------------------------------------------------------


def _rayjob(deployment, job=None, **status):
    return {"metadata": {"name": "e2e-llm-train"},
            "status": {"jobDeploymentStatus": deployment, **({"jobStatus": job} if job else {}), **status}}


PRE_RUNNING_FAILED = _rayjob("Failed", reason="PreRunningDeadlineExceeded",
                             message="The RayJob has passed the preRunningDeadlineSeconds.")


@pytest.mark.parametrize("rayjob, done, failed, detail", [
    ({"metadata": {"name": "e2e-llm-train"}}, False, False, "RayJob e2e-llm-train: New, job -"),
    (_rayjob("Initializing"), False, False, "RayJob e2e-llm-train: Initializing, job -"),
    (_rayjob("Running", "RUNNING"), False, False, "Running, job RUNNING"),
    (_rayjob("Retrying", "FAILED", failed=1), False, False, "Retrying, job FAILED, 1 failed attempt(s)"),
    (_rayjob("Complete", "SUCCEEDED"), True, False, "Complete, job SUCCEEDED"),
    (PRE_RUNNING_FAILED, False, True,
     "Failed, job - (PreRunningDeadlineExceeded: The RayJob has passed the preRunningDeadlineSeconds.)"),
    (_rayjob("Failed", "FAILED", reason="AppFailed", failed=3), False, True,
     "Failed, job FAILED, 3 failed attempt(s) (AppFailed)"),
    (_rayjob("ValidationFailed"), False, True, "ValidationFailed, job - (no reason given)"),
])
def test_rayjob_state(rayjob, done, failed, detail):
    check = rayjob_run(rayjob)
    assert (check.done, check.failed) == (done, failed)
    assert detail in check.detail


def test_wait_job_fails_at_once_with_kuberays_reason(monkeypatch, capsys):
    """`make wait STAGE=train TARGET=k8s`: a RayJob whose pods could not start fails at its
    preRunningDeadlineSeconds, and the wait ends there (kubectl wait on jobStatus sat out the timeout)."""
    from e2e_llm import cli, kuberay

    states = iter([_rayjob("Initializing"), PRE_RUNNING_FAILED, _rayjob("Complete", "SUCCEEDED")])
    commands = []

    def fake_run(cmd):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps(next(states)), "")
    monkeypatch.setattr(kuberay, "run_command", fake_run)
    code = cli.main(["wait-job", "--stage", "train", "--env", "prod", "--poll", "0", "--timeout", "60"])
    captured = capsys.readouterr()
    assert code == 3
    assert "error: job failed: RayJob e2e-llm-train: Failed, job - (PreRunningDeadlineExceeded" in captured.err
    assert len(commands) == 2 and commands[0][1:] == ["get", "rayjob", "e2e-llm-train", "-n", "e2e-llm-prod",
                                                      "-o", "json"]
    assert Path(commands[0][0]).parent == Path(sys.executable).parent  # the pinned kubectl, not PATH's


def test_wait_job_returns_when_the_job_succeeded(monkeypatch, capsys):
    from e2e_llm import cli, kuberay

    states = iter([_rayjob("Running", "RUNNING"), _rayjob("Complete", "SUCCEEDED")])
    monkeypatch.setattr(kuberay, "run_command",
                        lambda cmd: subprocess.CompletedProcess(cmd, 0, json.dumps(next(states)), ""))
    assert cli.main(["wait-job", "--stage", "batch", "--poll", "0"]) == 0
    assert "Complete, job SUCCEEDED" in capsys.readouterr().out


def test_wait_job_retries_a_failed_kubectl_call_and_stops_when_the_job_is_gone(monkeypatch, capsys):
    """kubectl failing is a status line: the API server busy for a moment is asked again, the
    RayJob gone (NotFound) ends the wait with exit 3; no traceback either way."""
    from e2e_llm import cli, kuberay

    def failing(stderr):
        def run(cmd):
            raise subprocess.CalledProcessError(1, cmd, "", stderr)
        return run
    answers = iter([failing("Unable to connect to the server: net/http: TLS handshake timeout"),
                    lambda cmd: subprocess.CompletedProcess(cmd, 0, json.dumps(_rayjob("Complete", "SUCCEEDED")), "")])
    monkeypatch.setattr(kuberay, "run_command", lambda cmd: next(answers)(cmd))
    assert cli.main(["wait-job", "--stage", "train", "--poll", "0"]) == 0
    assert "kubectl get rayjob e2e-llm-train: Unable to connect to the server" in capsys.readouterr().out

    monkeypatch.setattr(kuberay, "run_command", failing(
        'Error from server (NotFound): rayjobs.ray.io "e2e-llm-train" not found'))
    assert cli.main(["wait-job", "--stage", "train", "--poll", "0"]) == 3
    assert ("error: job failed: kubectl get rayjob e2e-llm-train: Error from server (NotFound)"
            in capsys.readouterr().err)


def test_kuberay_platform_runs_the_pinned_kubectl():
    """The engine canary and wait-service run the kubectl of this environment (as the Makefile
    and preflight do), not whichever one PATH holds, or none."""
    from e2e_llm.engine_canary import KubeRayPlatform

    platform = KubeRayPlatform(name="e2e-llm", namespace="e2e-llm-prod")
    assert platform.kubectl == str(Path(sys.executable).parent / "kubectl")
    assert KubeRayPlatform(name="x", namespace="y", kubectl="/opt/k").kubectl == "/opt/k"


# -- Anyscale -------------------------------------------------------------------------------


def _version(name, state="RUNNING", weight=100):
    return SimpleNamespace(name=name, state=state, weight=weight)


def _service(state, primary, canary=None):
    return SimpleNamespace(name="e2e-llm-prod", state=state, primary_version=primary, canary_version=canary)


@pytest.mark.parametrize("status, percent, done, failed, detail", [
    (_service("ROLLING_OUT", _version("v1", weight=90), _version("v2", weight=10)), 10, True, False, "v2 RUNNING"),
    (_service("ROLLING_OUT", _version("v1", weight=90), _version("v2", "STARTING", 10)), 10, False, False,
     "version v2 STARTING"),
    (_service("ROLLING_OUT", _version("v1", weight=100), _version("v2", weight=0)), 10, False, False, "want 10%"),
    (_service("ROLLING_OUT", _version("v1", weight=90), _version("v2", "UNHEALTHY", 10)), 10, False, True,
     "new version v2 UNHEALTHY"),
    (_service("RUNNING", _version("v2")), 100, True, False, "v2 RUNNING at 100%"),
    (_service("RUNNING", _version("v1")), 100, False, False, "not primary yet"),
    (_service("ROLLING_OUT", _version("v2", weight=90), _version("v3", weight=10)), 100, False, False,
     "canary v3 still present"),
    (_service("SYSTEM_FAILURE", _version("v2")), None, False, True, "state SYSTEM_FAILURE"),
])
def test_anyscale_rollout_state(status, percent, done, failed, detail):
    check = anyscale_rollout(status, percent, previous="v1")
    assert (check.done, check.failed) == (done, failed) and detail in check.detail, check


# -- the deploy path: canary -> gates -> promote, or roll back and fail ------------------------


class StallingKube:
    """kubectl recorder (git runs for real); after the overlay is applied the operator steps traffic to
    ``stall_at`` percent and, if that is 100, promotes the new cluster (recorded status shapes)."""

    def __init__(self, stall_at: int):
        self.stall_at, self.commands, self.applied, self.percent = stall_at, [], False, 0
        self.clock, self.applied_at = None, 0.0

    def status(self):
        if not self.applied:
            return {**APPLIED, "status": {**APPLIED["status"], "observedGeneration": 2}}
        if self.percent >= 100:
            return DONE
        doc = json.loads(json.dumps(AT_50))
        doc["status"]["pendingServiceStatus"]["trafficRoutedPercent"] = self.percent
        return doc

    def run(self, cmd):
        if cmd[0] == "git":
            return subprocess.run(cmd, check=True, capture_output=True, text=True)
        self.commands.append(cmd)
        if cmd[:3] == ["kubectl", "get", "rayservice"]:
            # the operator's timer: 10%, then +40% per minute, up to stall_at
            steps = int((self.clock.now() - self.applied_at) // 60) if self.applied else 0
            self.percent = min(self.stall_at, 10 + 40 * steps) if self.applied else 0
            return subprocess.CompletedProcess(cmd, 0, json.dumps(self.status()), "")
        if cmd[:3] == ["kubectl", "get", "raycluster"]:
            image = IMAGES[cmd[3]]
            spec = {"headGroupSpec": {"template": {"spec": {"containers": [{"image": image}]}}}}
            return subprocess.CompletedProcess(cmd, 0, json.dumps({"spec": spec}), "")
        if cmd[1] == "apply" and "shared" in cmd[-1]:  # the whole overlay: the new spec
            self.applied, self.applied_at = True, self.clock.now()
        elif cmd[1] == "apply":  # the rollback re-applies the serve component of REV
            self.applied, self.percent = False, 0
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _engine(monkeypatch, tmp_path, platform_factory, samples):
    """`e2e-llm canary --platform ...` (what `make canary-engine` and the workflow run) with the
    platform and metrics replaced, on a fake clock."""
    from e2e_llm import engine_canary
    from e2e_llm.canary import Controller, RolloutLog, load_policy
    from e2e_llm.engine_canary import GroupedMetrics, PlatformPreflight, PlatformRouter, engine_policy

    clock = Clock()
    clock.t = 1_000.0
    policy = load_policy(ROOT / "configs/canary.yaml")
    policy = policy.model_copy(update={"alias": "e2e-llm-prod-test", "steps": engine_canary.platform_steps(
                                           [10, 50, 100], "k8s"), "step_window_s": 60.0,
                                       "slo": policy.slo.model_copy(update={"min_requests": 1})})
    made = {}

    def fake_open(config, *, platform, env, rev="HEAD~1", policy_path=None, prometheus_url=None, **_):
        impl = made["platform"] = platform_factory(clock)
        metrics = GroupedMetrics(impl, lambda: samples(impl, clock))
        ruled = engine_policy(policy, platform)
        return Controller(policy=ruled, task=None, canary_rows=[], log=RolloutLog(str(tmp_path / "log.jsonl")),
                          router=PlatformRouter(impl), prober=None, metrics=metrics, clock=clock, out=print,
                          preflight=PlatformPreflight(impl) if ruled.preflight.enabled else None)

    monkeypatch.setattr(engine_canary, "open_engine_controller", fake_open)
    return made


_COUNTS: dict[int, dict] = {}


def _healthy_samples(platform, clock):
    """Cumulative request counters per version group, 2 req/s each, no errors."""
    from e2e_llm.canary_io import LATENCY_BUCKET, REQUESTS

    status = platform.status()
    last = _COUNTS.setdefault(id(platform), {"t": clock.now()})
    elapsed, last["t"] = clock.now() - last["t"], clock.now()
    out = []
    for group in (status.primary, status.canary):
        if group:
            last[group] = last.get(group, 0.0) + 2 * elapsed
            out += [(REQUESTS, {platform.group_label: group, "status": "200"}, last[group]),
                    (LATENCY_BUCKET, {platform.group_label: group, "le": "+Inf"}, last[group])]
    return out


def _kuberay(kube):
    from e2e_llm.engine_canary import KubeRayPlatform

    def factory(clock):
        kube.clock = clock
        return KubeRayPlatform(name="e2e-llm", namespace="e2e-llm-prod", rev="HEAD", run=kube.run, image=NEW,
                               kubectl="kubectl",
                               wait=lambda check: wait_until(check, timeout_s=900, poll_s=60, clock=clock.now,
                                                             sleep=clock.sleep, out=print))
    return factory


def test_deploy_job_waits_for_the_upgrades_real_end_and_promotes(monkeypatch, tmp_path, capsys):
    from e2e_llm import cli

    kube = StallingKube(stall_at=100)
    _engine(monkeypatch, tmp_path, _kuberay(kube), _healthy_samples)
    code = cli.main(["canary", "--profile", "cluster", "--platform", "k8s", "--env", "prod"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PROMOTED" in out and "Ready on cluster e2e-llm-bbbbb" in out
    applies = [c for c in kube.commands if c[1] == "apply"]
    assert len(applies) == 1 and applies[0][-1].endswith("(shared,serve,monitoring)")
    assert ["kubectl", "get", "raycluster", "e2e-llm-bbbbb", "-n", "e2e-llm-prod", "-o", "json"] in kube.commands


def test_deploy_job_with_a_stuck_upgrade_rolls_back_and_fails_with_the_reason(monkeypatch, tmp_path, capsys):
    from e2e_llm import cli

    kube = StallingKube(stall_at=50)  # the operator never gets past 50%
    _engine(monkeypatch, tmp_path, _kuberay(kube), _healthy_samples)
    code = cli.main(["canary", "--profile", "cluster", "--platform", "k8s", "--env", "prod"])
    captured = capsys.readouterr()
    assert code == 3
    assert "rollout not finished after 900s" in captured.err and "at 50% traffic" in captured.err
    assert "rolling back" in captured.err and "ROLLED BACK" in captured.out
    last_apply = [c for c in kube.commands if c[1] == "apply"][-1]
    assert last_apply[-1].endswith("(serve)") and "e2e-llm-rollback-" in last_apply[4]


@pytest.fixture
def anyscale_sdk():
    """The SDK's fake client with a running service, taught canary weights (as the real backend)
    and, when ``fail`` is set, to report the new version UNHEALTHY."""
    from anyscale.service import ServiceSDK
    from anyscale.service.models import ServiceConfig
    from anyscale_fake import CanaryFake

    fake = CanaryFake()
    sdk = ServiceSDK(client=fake)
    sdk.deploy(ServiceConfig.from_yaml(str(ROOT / "services/llm.yaml")).options(name="e2e-llm-prod"))
    fake._services[sdk.status(name="e2e-llm-prod").id].current_state = "RUNNING"
    return fake, sdk


def _anyscale(sdk):
    from e2e_llm.engine_canary import AnyscalePlatform

    def factory(clock):
        return AnyscalePlatform(ROOT / "services/llm.yaml", "e2e-llm-prod", sdk=sdk,
                                wait=lambda check: wait_until(check, timeout_s=600, poll_s=30, clock=clock.now,
                                                              sleep=clock.sleep, out=print))
    return factory


def test_anyscale_deploy_job_runs_canary_gates_and_promotes(monkeypatch, tmp_path, capsys, anyscale_sdk):
    from e2e_llm import cli

    fake, sdk = anyscale_sdk
    before = sdk.status(name="e2e-llm-prod").primary_version.name
    _engine(monkeypatch, tmp_path, _anyscale(sdk), _healthy_samples)
    assert cli.main(["canary", "--profile", "cluster", "--platform", "anyscale", "--env", "prod"]) == 0
    assert "PROMOTED" in capsys.readouterr().out
    after = sdk.status(name="e2e-llm-prod")
    assert after.canary_version is None and after.primary_version.name != before and fake.rollbacks == []


def test_anyscale_deploy_job_with_an_unhealthy_canary_is_rejected_at_0_percent_and_fails(monkeypatch, tmp_path,
                                                                                        capsys, anyscale_sdk):
    from e2e_llm import cli

    fake, sdk = anyscale_sdk
    fake.fail = True
    before = sdk.status(name="e2e-llm-prod").primary_version.name
    deployed = len(fake.rollouts)
    _engine(monkeypatch, tmp_path, _anyscale(sdk), _healthy_samples)
    assert cli.main(["canary", "--profile", "cluster", "--platform", "anyscale", "--env", "prod"]) == 3
    captured = capsys.readouterr()
    # the preflight deployed it at 0%, saw it unhealthy and removed it: no traffic ever reached it
    assert "did not come up healthy at 0% traffic" in captured.out and "UNHEALTHY" in captured.out
    assert "REJECTED" in captured.out
    assert fake.rollouts[deployed:] == [0]
    assert fake.rollbacks == [sdk.status(name="e2e-llm-prod").id]
    assert sdk.status(name="e2e-llm-prod").primary_version.name == before
