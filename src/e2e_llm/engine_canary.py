# SPDX-License-Identifier: Apache-2.0
"""Engine/infrastructure canary: a new base model, vLLM or Ray version rolls out through the
platform's own mechanism while our SLO gate watches it and rolls back on failure.

- Anyscale: ``service deploy --canary-percent N`` (the same call with a larger N shifts
  traffic; 100 completes it) and ``service rollback``, through the ``anyscale`` SDK.
- KubeRay: the RayService's ``NewClusterWithIncrementalUpgrade`` strategy moves traffic on
  the operator's own timer (``stepSizePercent`` every ``intervalSeconds``), so applying the new
  spec starts it and nothing can set the percentage; the gate watches each window and a failure
  re-applies the previous revision's manifests (:func:`e2e_llm.kuberay.rollback_service`, what
  ``make rollback TARGET=k8s`` does).

Before any traffic (the adapter canary's preflight, where the platform allows one):

- Anyscale: :class:`PlatformPreflight` deploys the new version at ``canary_percent`` 0 and waits
  until the platform reports it RUNNING at 0%, i.e. its cluster and Serve apps (the engine, its
  health check) came up healthy; a version that does not is rolled back through the SDK before a
  single request reaches it. It cannot send a request *through* the new version: the service URL
  routes by weight only, so "answers one request" is the platform's health check, not ours.
- KubeRay: there is no pre-traffic step to drive. ``NewClusterWithIncrementalUpgrade`` brings the
  pending RayCluster up and shifts traffic only once its Serve applications are healthy (the
  operator's own pre-traffic check); nothing can hold it at 0%, so the controller's preflight is
  off (``preflight.enabled`` false for ``--platform k8s``) and the first SLO window is the check.

The state machine, rollout log, resume and decision table are the adapter canary's
(:class:`e2e_llm.canary.Controller`): the platform stands behind its :class:`Router` with the
two fixed version names ``primary`` and ``canary``, the quality gate (and its shadow run) is
skipped (a platform canary cannot be addressed by version), and the SLO gate compares the ingress metrics grouped
by the label that tells the two clusters apart (KubeRay: ``ray_io_cluster``, set by the
rendered PodMonitor; the active and pending RayCluster names come from the RayService status).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from e2e_llm import kuberay
from e2e_llm.canary import AliasState, PreflightResult, VersionStats
from e2e_llm.canary_io import LATENCY_BUCKET, REQUESTS, add_sample
from e2e_llm.env_tools import find_tool
from e2e_llm.rollout_wait import Check, anyscale_rollout, rayservice_upgrade, wait_until

PRIMARY, CANARY = "primary", "canary"
# How long one platform step (a deploy, the end of an upgrade) may take before RolloutStuck.
DEFAULT_WAIT_S = 1800.0


@dataclass(frozen=True)
class PlatformStatus:
    primary: str | None  # value of the metrics group label for the version serving before the rollout
    canary: str | None  # ... and for the new version (None: no rollout in progress)
    canary_percent: float = 0.0


class Platform(Protocol):
    group_label: str

    def status(self) -> PlatformStatus: ...

    def deploy(self, percent: int) -> None: ...

    def rollback(self) -> None: ...

    def finish(self) -> None: ...


class PlatformRouter:
    """:class:`e2e_llm.canary.Router` over a platform rollout (versions ``primary``/``canary``)."""

    def __init__(self, platform: Platform):
        self.platform = platform

    def get(self, alias: str) -> AliasState:
        status = self.platform.status()
        return AliasState(PRIMARY, CANARY if status.canary else None, float(status.canary_percent))

    def set(self, alias: str, state: AliasState) -> None:
        if state.stable == CANARY:
            self.platform.finish()
        elif state.candidate is None:
            self.platform.rollback()
        else:
            self.platform.deploy(round(state.candidate_weight))


class PlatformPreflight:
    """:class:`e2e_llm.canary.Preflight` for a platform that can run the new version at 0%
    (Anyscale): deploy at 0% and wait for it to run healthy (the platform's wait, not the
    policy's ``deadline_s``: a new cluster takes minutes); a version that does not come up is
    rolled back before any traffic reaches it."""

    def __init__(self, platform: Platform):
        self.platform = platform

    def check(self, version: str, row: dict[str, str], deadline_s: float, max_tokens: int) -> PreflightResult:
        try:
            self.platform.deploy(0)
        except Exception as exc:  # noqa: BLE001  RolloutStuck or an SDK error: the check failed
            reason = f"the new version did not come up healthy at 0% traffic: {type(exc).__name__}: {exc}"
            try:
                self.platform.rollback()
            except Exception as undo:  # noqa: BLE001
                reason += f"; removing it failed too ({type(undo).__name__}: {undo}): roll back by hand"
            return PreflightResult(False, reason, [{"replica": version, "ok": False, "reason": reason,
                                                    "latency_s": None}])
        return PreflightResult(True, None, [{"replica": f"{version} (0% traffic)", "ok": True,
                                             "reason": "running healthy at 0%", "latency_s": None}])


class GroupedMetrics:
    """The ingress counters summed per cluster (``group_label``), named primary/canary by the
    platform's current status. ``samples`` returns Prometheus samples (name, labels, value)."""

    def __init__(self, platform: Platform, samples: Callable[[], Sequence[tuple[str, dict[str, str], float]]],
                 count_client_errors: bool = True):
        self.platform = platform
        self.samples = samples
        self.count_client_errors = count_client_errors

    def snapshot(self) -> dict[str, VersionStats]:
        status = self.platform.status()
        names = {status.primary: PRIMARY, status.canary: CANARY}
        out: dict[str, VersionStats] = {}
        for name, labels, value in self.samples():
            group = names.get(labels.get(self.platform.group_label))
            if group is None:
                continue
            add_sample(out.setdefault(group, VersionStats()), name, labels, value, self.count_client_errors)
        return out


def prometheus_samples(url: str, label: str, fetch=None) -> Callable[[], list[tuple[str, dict[str, str], float]]]:
    """Samples of the ingress metrics per ``label`` from a Prometheus server's query API."""
    import urllib.parse

    from e2e_llm.canary_io import fetch_text

    fetch = fetch or fetch_text

    def samples() -> list[tuple[str, dict[str, str], float]]:
        out = []
        for name, by in ((REQUESTS, f"{label}, status"), (LATENCY_BUCKET, f"{label}, le")):
            query = urllib.parse.urlencode({"query": f"sum by ({by}) ({name})"})
            body = json.loads(fetch(f"{url.rstrip('/')}/api/v1/query?{query}", 10.0))
            if body.get("status") != "success":
                raise RuntimeError(f"prometheus query failed: {body.get('error', body)}")
            out.extend((name, item["metric"], float(item["value"][1])) for item in body["data"]["result"])
        return out

    return samples


# ---------------------------------------------------------------------------------------
# Anyscale


class AnyscalePlatform:
    """A service rollout on Anyscale through the SDK (``sdk``: ``anyscale.service`` or a
    ``ServiceSDK`` on the SDK's fake client in tests). Versions are told apart in the metrics by
    ``group_label``, whose values are the service version names."""

    def __init__(self, service_yaml: str | Path, name: str, *, sdk: Any = None, max_surge_percent: int | None = None,
                 group_label: str = "service_version", wait: Callable[[Callable[[], Check]], Check] | None = None):
        from anyscale.service.models import ServiceConfig

        self.config = ServiceConfig.from_yaml(str(service_yaml)).options(name=name)
        self.name = name
        if sdk is None:
            import anyscale

            sdk = anyscale.service
        self.sdk = sdk
        self.max_surge_percent = max_surge_percent
        self.group_label = group_label
        # Each deploy is waited on until the platform runs it (RolloutStuck on failure/timeout).
        self.wait = wait or (lambda check: wait_until(check, timeout_s=DEFAULT_WAIT_S, poll_s=15.0))
        self._previous: str | None = None

    def status(self) -> PlatformStatus:
        status = self.sdk.status(name=self.name)
        primary, canary = status.primary_version, status.canary_version
        return PlatformStatus(primary.name if primary else None, canary.name if canary else None,
                              float(canary.weight) if canary else 0.0)

    def deploy(self, percent: int) -> None:
        current = self.sdk.status(name=self.name)
        if current.canary_version is None and current.primary_version is not None:
            self._previous = current.primary_version.name  # the version serving before this rollout
        self.sdk.deploy(self.config, canary_percent=percent, max_surge_percent=self.max_surge_percent)
        self.wait(lambda: anyscale_rollout(self.sdk.status(name=self.name), percent, self._previous))

    def rollback(self) -> None:
        self.sdk.rollback(name=self.name, max_surge_percent=self.max_surge_percent)

    def finish(self) -> None:
        self.deploy(100)


# ---------------------------------------------------------------------------------------
# KubeRay


class KubeRayPlatform:
    """A RayService incremental upgrade of the manifests under ``root`` (the project root).
    ``run`` executes a command list (:func:`e2e_llm.kuberay.run_command` in real use; a recorder
    in tests)."""

    group_label = "ray_io_cluster"

    def __init__(self, *, name: str, namespace: str, env: str = "prod", rev: str = "HEAD~1",
                 kubectl: str | None = None, root: Path | None = None,
                 run: Callable[[list[str]], subprocess.CompletedProcess] | None = None,
                 image: str | None = None, wait: Callable[[Callable[[], Check]], Check] | None = None):
        self.name, self.namespace, self.env, self.rev = name, namespace, env, rev
        self.kubectl = kubectl or find_tool("kubectl") or "kubectl"  # the pinned one, as the Makefile's
        self.root = Path(root) if root else Path.cwd()
        self.run = run or kuberay.run_command
        self.image = image  # the image the applied spec names: the upgrade ends on it
        self.wait = wait or (lambda check: wait_until(check, timeout_s=DEFAULT_WAIT_S, poll_s=15.0))

    def _status_object(self) -> dict[str, Any]:
        cmd = [self.kubectl, "get", "rayservice", self.name, "-n", self.namespace, "-o", "json"]
        return json.loads(self.run(cmd).stdout)

    def cluster_image(self, cluster: str) -> str | None:
        result = self.run([self.kubectl, "get", "raycluster", cluster, "-n", self.namespace, "-o", "json"])
        containers = json.loads(result.stdout)["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        return containers[0].get("image") if containers else None

    def upgrade(self) -> Check:
        """Where the upgrade stands (see :func:`e2e_llm.rollout_wait.rayservice_upgrade`)."""
        data = self._status_object()
        return rayservice_upgrade(data, self.cluster_image, self.image)

    def status(self) -> PlatformStatus:
        cmd = [self.kubectl, "get", "rayservice", self.name, "-n", self.namespace, "-o", "json"]
        data = json.loads(self.run(cmd).stdout)
        status = data.get("status") or {}
        active = status.get("activeServiceStatus") or {}
        pending = status.get("pendingServiceStatus") or {}
        return PlatformStatus(active.get("rayClusterName") or None, pending.get("rayClusterName") or None,
                              float(pending.get("trafficRoutedPercent") or 0))

    def deploy(self, percent: int) -> None:
        # The operator moves traffic itself; the new spec is applied once, when no upgrade runs.
        if self.status().canary is None:
            kuberay.apply_service(self.root, self.env, kubectl=self.kubectl, run=self.run)

    def rollback(self) -> None:
        kuberay.rollback_service(self.root, self.env, self.rev, kubectl=self.kubectl, run=self.run)

    def finish(self) -> None:
        """The operator completes the upgrade at 100%: wait for its real end on the new spec."""
        self.wait(self.upgrade)


# ---------------------------------------------------------------------------------------
# Wiring for `e2e-llm canary --platform anyscale|k8s`


def platform_steps(steps: list[int], platform: str) -> list[int]:
    """The gated steps stop below 100 on both platforms; promotion is the step to 100 that
    ``finish`` runs and waits on. Anyscale completes a rollout (and drops the old version) at
    100%, after which it cannot roll back; KubeRay's operator turns the pending cluster into the
    active one at 100%, after which the metrics cannot tell the versions apart."""
    return [s for s in steps if s < 100] or [50]


def engine_policy(policy, platform: str):
    """The policy as a platform canary runs it: its gated steps (:func:`platform_steps`), no
    shadow quality gate (a platform's versions cannot be probed by name) and a preflight only
    where the platform can hold the new version at 0% (Anyscale; see the module docstring)."""
    preflight = policy.preflight.model_copy(update={"enabled": policy.preflight.enabled and platform == "anyscale"})
    return policy.model_copy(update={"steps": platform_steps(policy.steps, platform), "shadow": False,
                                     "preflight": preflight})


def open_engine_controller(config, *, platform: str, env: str, rev: str = "HEAD~1", policy_path: str | None = None,
                           prometheus_url: str | None = None, platform_impl: Platform | None = None, out=print):
    """The canary :class:`~e2e_llm.canary.Controller` driving a platform rollout of the rendered
    service (``services/llm.yaml`` / the RayService of ``configs/deploy.yaml``), SLO gate only.
    Its log is ``<adapter store>/rollouts-<service>-<env>-<platform>.jsonl``."""
    from e2e_llm.canary import Controller, RolloutLog, load_policy
    from e2e_llm.canary_io import rollout_log_uri
    from e2e_llm.config import ConfigError
    from e2e_llm.deploy import load_deploy
    from e2e_llm.store import AdapterStore

    deploy = load_deploy(root=config.root)
    name = f"{deploy.name}-{env}"
    policy = engine_policy(load_policy(config.path(policy_path or config.canary.policy)), platform)
    policy = policy.model_copy(update={"alias": f"{name}-{platform}"})
    if platform_impl is None:
        if platform == "anyscale":
            platform_impl = AnyscalePlatform(config.root / "services" / "llm.yaml", name)
        elif platform == "k8s":
            platform_impl = KubeRayPlatform(name=deploy.name, namespace=name, env=env, rev=rev, root=config.root,
                                            image=deploy.image_ref("serve"))
        else:
            raise ConfigError(f"unknown platform {platform!r} (anyscale or k8s)")
    url = prometheus_url or config.canary.prometheus_url
    if not url:
        raise ConfigError(f"{config.source_file}: canary.prometheus_url is needed to watch a platform canary")
    metrics = GroupedMetrics(platform_impl, prometheus_samples(url, platform_impl.group_label),
                             policy.slo.count_client_errors)
    store = AdapterStore.from_config(config)
    log = RolloutLog(rollout_log_uri(store, policy.alias), store.storage_kw)
    preflight = PlatformPreflight(platform_impl) if policy.preflight.enabled else None
    return Controller(policy=policy, task=None, canary_rows=[], log=log, router=PlatformRouter(platform_impl),
                      prober=None, metrics=metrics, out=out, preflight=preflight)
