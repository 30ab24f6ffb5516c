# SPDX-License-Identifier: Apache-2.0
"""Wait for a service rollout's or a job's real end, or say clearly why it did not end.

``kubectl wait --for=condition=Ready`` is true on the *old* cluster while a KubeRay upgrade
runs, so Ready alone says nothing about the new spec. A RayService upgrade (KubeRay v1.7,
``ray.io/v1`` RayService ``status``) has ended when all of these hold:
- ``status.observedGeneration`` >= ``metadata.generation`` (the operator has seen the spec);
- condition ``UpgradeInProgress`` is not ``True`` and ``status.pendingServiceStatus`` names no
  cluster (reason ``NoPendingCluster``: the pending cluster was promoted or dropped);
- condition ``Ready`` is ``True`` (reason ``NonZeroServeEndpoints``) and every application in
  ``status.activeServiceStatus.applicationStatuses`` is ``RUNNING``;
- the active RayCluster (``activeServiceStatus.rayClusterName``) runs the expected image: the
  content-addressed one the applied manifests name (so "done" means done *on the new spec*).
It has failed when ``Ready`` has reason ``InitializingTimeout``, or an application reports
``DEPLOY_FAILED``/``UNHEALTHY`` on the pending cluster. The condition types and reasons are the
operator's (``rayservice_types.go``); the status field names are the CRD's
(``../shared/k8s/crds/kuberay-v1.7.0/ray.io_rayservices.yaml``).

A RayJob (KubeRay v1.7, ``ray.io/v1`` RayJob ``status``) has succeeded when ``status.jobStatus``
is ``SUCCEEDED``, and has failed when ``status.jobDeploymentStatus`` is ``Failed`` or
``ValidationFailed``, with ``status.reason`` saying where: ``PreRunningDeadlineExceeded`` (not
running by ``preRunningDeadlineSeconds``: a pod that cannot be scheduled, pulled or admitted),
``SubmissionFailed``, ``DeadlineExceeded``, ``AppFailed``, ``ValidationFailed``. A failed attempt
that ``backoffLimit`` retries is ``Retrying``, not failed.

An Anyscale rollout has ended when the service is ``RUNNING`` with the expected version at the
expected weight (the canary at its percent, or the new primary alone at 100), and has failed on
``UNHEALTHY``/``SYSTEM_FAILURE``/``TERMINATED`` of the service or the new version.

Usage:
    wait_until(lambda: rayservice_upgrade(get_rayservice(), cluster_image, image), timeout_s=1800)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

READY, UPGRADE_IN_PROGRESS = "Ready", "UpgradeInProgress"
INITIALIZING_TIMEOUT = "InitializingTimeout"
APP_FAILED = ("DEPLOY_FAILED", "UNHEALTHY")
ANYSCALE_FAILED = ("UNHEALTHY", "SYSTEM_FAILURE", "TERMINATED", "TERMINATING")
JOB_FAILED = ("Failed", "ValidationFailed")


class RolloutStuck(RuntimeError):
    """A rollout failed or did not end in time; the message says which and why."""


@dataclass(frozen=True)
class Check:
    done: bool
    detail: str
    failed: bool = False


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def _apps(service_status: dict[str, Any]) -> dict[str, str]:
    apps = service_status.get("applicationStatuses") or {}
    return {name: (app or {}).get("status", "") for name, app in apps.items()}


def rayservice_upgrade(rayservice: dict[str, Any], cluster_image: Callable[[str], str | None] | None = None,
                       expected_image: str | None = None) -> Check:
    """Where a RayService upgrade stands, from its object (``kubectl get rayservice -o json``);
    ``cluster_image(name)`` returns the head image of a RayCluster (None: not found)."""
    meta, status = rayservice.get("metadata") or {}, rayservice.get("status") or {}
    name = f"RayService {meta.get('namespace', '')}/{meta.get('name', '?')}".replace(" /", " ")
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and (observed is None or observed < generation):
        return Check(False, f"{name}: operator has not observed generation {generation} yet (observed {observed})")
    ready, upgrading = _condition(status, READY), _condition(status, UPGRADE_IN_PROGRESS)
    if ready.get("reason") == INITIALIZING_TIMEOUT:
        return Check(False, f"{name}: Ready is False, reason {INITIALIZING_TIMEOUT}: {ready.get('message', '')}",
                     failed=True)
    pending = status.get("pendingServiceStatus") or {}
    if pending.get("rayClusterName") or upgrading.get("status") == "True":
        failed = {a: s for a, s in _apps(pending).items() if s in APP_FAILED}
        if failed:
            return Check(False, f"{name}: pending cluster {pending.get('rayClusterName')}: applications "
                                f"{', '.join(f'{a} {s}' for a, s in sorted(failed.items()))}", failed=True)
        return Check(False, f"{name}: upgrade in progress (UpgradeInProgress {upgrading.get('status', '?')}, "
                            f"{upgrading.get('reason', '')}): pending cluster {pending.get('rayClusterName') or '-'} "
                            f"at {pending.get('trafficRoutedPercent', 0)}% traffic")
    if ready.get("status") != "True":
        return Check(False, f"{name}: Ready is {ready.get('status', 'missing')} ({ready.get('reason', '')}: "
                            f"{ready.get('message', '')})")
    active = status.get("activeServiceStatus") or {}
    not_running = {a: s for a, s in _apps(active).items() if s != "RUNNING"}
    if not_running:
        return Check(False, f"{name}: applications not RUNNING: "
                            f"{', '.join(f'{a} {s}' for a, s in sorted(not_running.items()))}")
    cluster = active.get("rayClusterName")
    if expected_image and cluster_image is not None:
        image = cluster_image(cluster) if cluster else None
        if image != expected_image:
            return Check(False, f"{name}: active cluster {cluster} runs {image}, not {expected_image} (the upgrade "
                                "to the applied spec has not started or was dropped)")
    return Check(True, f"{name}: Ready on cluster {cluster}, no upgrade in progress")


def _state(obj: Any) -> str:
    state = getattr(obj, "state", None)
    return str(getattr(state, "value", state))


def anyscale_rollout(status: Any, canary_percent: int | None = None, previous: str | None = None) -> Check:
    """Where an Anyscale service rollout stands, from ``anyscale.service.status(...)``.
    ``canary_percent`` below 100: the canary version must run at that weight (the service may
    say ROLLING_OUT meanwhile); None or 100: the rollout is complete, the new version alone is
    primary (not ``previous``, the primary before the rollout) and the service RUNNING."""
    name = f"Anyscale service {status.name}"
    state = _state(status)
    completing = canary_percent in (None, 100)
    new = status.primary_version if completing else status.canary_version
    if state in ANYSCALE_FAILED or _state(new) in ANYSCALE_FAILED:
        return Check(False, f"{name}: state {state}, new version {getattr(new, 'name', None)} {_state(new)}",
                     failed=True)
    if new is None or (completing and previous and new.name == previous):
        return Check(False, f"{name}: {state}, the new version is not {'primary' if completing else 'the canary'} yet")
    if not completing and round(float(new.weight)) != canary_percent:
        return Check(False, f"{name}: canary {new.name} at {new.weight}% (want {canary_percent}%)")
    if completing and status.canary_version is not None:
        return Check(False, f"{name}: {state}, canary {status.canary_version.name} still present")
    if _state(new) != "RUNNING" or (completing and state != "RUNNING"):
        return Check(False, f"{name}: state {state}, version {new.name} {_state(new)}")
    return Check(True, f"{name}: {state}, version {new.name} RUNNING at {new.weight}%")


def rayjob_run(rayjob: dict[str, Any]) -> Check:
    """Where a RayJob's run stands, from ``kubectl get rayjob -o json``."""
    name = f"RayJob {(rayjob.get('metadata') or {}).get('name', '?')}"
    status = rayjob.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-"
    line = f"{name}: {deployment}, job {job}"
    if status.get("failed"):
        line += f", {status['failed']} failed attempt(s)"
    if job == "SUCCEEDED":
        return Check(True, line)
    if deployment in JOB_FAILED:
        why = ": ".join(part for part in (status.get("reason"), status.get("message")) if part)
        return Check(False, f"{line} ({why or 'no reason given'})", failed=True)
    return Check(False, line)


def wait_until(check: Callable[[], Check], *, timeout_s: float, poll_s: float = 10.0,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
               out: Callable[[str], None] = print, what: str = "rollout") -> Check:
    """Poll ``check`` until done; raise :class:`RolloutStuck` on failure or after ``timeout_s``
    with the last status in the message. Prints each new status line once."""
    deadline = clock() + timeout_s
    last = None
    while True:
        result = check()
        if result.detail != last:
            out(result.detail)
            last = result.detail
        if result.done:
            return result
        if result.failed:
            raise RolloutStuck(f"{what} failed: {result.detail}")
        if clock() >= deadline:
            raise RolloutStuck(f"{what} not finished after {timeout_s:.0f}s: {result.detail}")
        sleep(min(poll_s, max(deadline - clock(), 0.0)))
