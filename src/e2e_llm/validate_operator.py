# SPDX-License-Identifier: Apache-2.0
"""Ladder step 4a: the KubeRay operator's reconcile-time rules the CRD schema does not encode
(``ValidateRayJobSpec``/``ValidateRayServiceSpec``/``ValidateRayClusterSpec`` in v1.7)."""

from __future__ import annotations

from typing import Any

import yaml

from e2e_llm.validate_common import DNS1035, _int, _name, _version_tuple

UPGRADE_TYPES = ("NewCluster", "None", "NewClusterWithIncrementalUpgrade")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MAX_CLUSTER_NAME = 53          # KubeRay MaxRayClusterNameLength
MAX_JOB_OR_SERVICE_NAME = 47   # MaxRayJobNameLength / MaxRayServiceNameLength (cluster name - 6)
MIN_TOKEN_AUTH_RAY = (2, 52, 0)


def _cluster_rules(name: str, spec: dict[str, Any], where: str) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec") or {}
    if not ((head.get("template") or {}).get("spec") or {}).get("containers"):
        problems.append(f"{name}: {where}.headGroupSpec.template.spec.containers: at least one container is required")
    groups = spec.get("workerGroupSpecs") or []
    seen: set[str] = set()
    for i, group in enumerate(groups):
        gname = group.get("groupName", "")
        if gname in seen:
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].groupName: duplicate worker group name {gname!r}")
        seen.add(gname)
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].template.spec.containers: "
                            "at least one container is required")
        lo, hi = _int(group.get("minReplicas"), 0), _int(group.get("maxReplicas"), 2**31 - 1)
        n = _int(group.get("replicas"))
        if lo > hi:
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].minReplicas: {lo} > maxReplicas {hi}")
        if n is not None and not lo <= n <= hi:
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].replicas: {n} outside [minReplicas {lo}, "
                            f"maxReplicas {hi}]")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].resources: set in both rayStartParams and "
                            "resources; use only one")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = _version_tuple(spec.get("rayVersion", ""))
        if version is None:
            problems.append(f"{name}: {where}.rayVersion: required (X.Y.Z) when authOptions.mode is 'token'")
        elif version < MIN_TOKEN_AUTH_RAY:
            problems.append(f"{name}: {where}.rayVersion: authOptions.mode 'token' needs Ray >= 2.52.0, "
                            f"got {spec['rayVersion']}")
    return problems


def check_operator_rules(doc: dict[str, Any]) -> list[str]:
    """KubeRay's reconcile-time validation (not in the CRD schema) for RayJob and RayService."""
    name, kind = _name(doc), doc.get("kind")
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    problems = []
    obj_name = meta.get("name", "")
    limit = MAX_JOB_OR_SERVICE_NAME if kind in ("RayJob", "RayService") else MAX_CLUSTER_NAME
    if not DNS1035.match(obj_name) or len(obj_name) > limit:
        problems.append(f"{name}: metadata.name: must be a DNS-1035 label of at most {limit} characters")
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"{name}: spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
        shutdown = spec.get("shutdownAfterJobFinishes", False)
        ttl = _int(spec.get("ttlSecondsAfterFinished"), 0)
        backoff = _int(spec.get("backoffLimit"), 0)
        if ttl > 0 and not shutdown:
            problems.append(f"{name}: spec.ttlSecondsAfterFinished: only valid with shutdownAfterJobFinishes: true")
        if ttl < 0:
            problems.append(f"{name}: spec.ttlSecondsAfterFinished: must be non-negative")
        if spec.get("suspend") and not shutdown:
            problems.append(f"{name}: spec.suspend: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            problems.append(f"{name}: spec.rayClusterSpec: one of rayClusterSpec or clusterSelector must be set")
        if mode == "InteractiveMode" and backoff > 0:
            problems.append(f"{name}: spec.backoffLimit: incompatible with InteractiveMode")
        if backoff < 0:
            problems.append(f"{name}: spec.backoffLimit: must be non-negative")
        for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if _int(spec.get(field), 1) <= 0:
                problems.append(f"{name}: spec.{field}: must be a positive integer")
        if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
            problems.append(f"{name}: spec.submissionMode: SidecarMode supports no submitterPodTemplate/Config")
        if not str(spec.get("entrypoint", "")).strip() and mode != "InteractiveMode":
            problems.append(f"{name}: spec.entrypoint: required unless submissionMode is InteractiveMode")
        if spec.get("runtimeEnvYAML"):
            try:
                yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as exc:
                problems.append(f"{name}: spec.runtimeEnvYAML: not valid YAML: {exc}")
        if spec.get("rayClusterSpec"):
            problems += _cluster_rules(name, spec["rayClusterSpec"], "spec.rayClusterSpec")
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig") or {}
        problems += _cluster_rules(name, cluster, "spec.rayClusterConfig")
        head_svc = (cluster.get("headGroupSpec") or {}).get("headService") or {}
        if (head_svc.get("metadata") or {}).get("name"):
            problems.append(f"{name}: spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
        strategy = spec.get("upgradeStrategy") or {}
        utype = strategy.get("type")
        if utype is not None and utype not in UPGRADE_TYPES:
            problems.append(f"{name}: spec.upgradeStrategy.type: {utype!r} is not one of {', '.join(UPGRADE_TYPES)}")
        if _int(spec.get("rayClusterDeletionDelaySeconds"), 0) < 0:
            problems.append(f"{name}: spec.rayClusterDeletionDelaySeconds: must be non-negative")
        if utype == "NewClusterWithIncrementalUpgrade":
            problems += _incremental_upgrade_rules(name, cluster, strategy.get("clusterUpgradeOptions"))
        if not spec.get("serveConfigV2"):
            problems.append(f"{name}: spec.serveConfigV2: required (the Serve applications to deploy)")
    return problems


def _incremental_upgrade_rules(name: str, cluster: dict[str, Any], options: dict[str, Any] | None) -> list[str]:
    where = "spec.upgradeStrategy.clusterUpgradeOptions"
    problems = []
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append(f"{name}: spec.rayClusterConfig.enableInTreeAutoscaling: must be true for "
                        "NewClusterWithIncrementalUpgrade (the Ray autoscaler is required)")
    if not options:
        return [*problems, f"{name}: {where}: required for NewClusterWithIncrementalUpgrade"]
    surge = _int(options.get("maxSurgePercent"), 100)
    step = _int(options.get("stepSizePercent"))
    if not 0 <= surge <= 100:
        problems.append(f"{name}: {where}.maxSurgePercent: must be between 0 and 100")
    if step is None or not 0 <= step <= 100:
        problems.append(f"{name}: {where}.stepSizePercent: required, between 0 and 100")
    elif step > surge:
        problems.append(f"{name}: {where}.stepSizePercent: {step} exceeds maxSurgePercent {surge} (a step cannot "
                        "move more traffic than the surge capacity)")
    if _int(options.get("intervalSeconds"), 0) <= 0:
        problems.append(f"{name}: {where}.intervalSeconds: required, greater than 0")
    if not options.get("gatewayClassName"):
        problems.append(f"{name}: {where}.gatewayClassName: required for NewClusterWithIncrementalUpgrade")
    return problems

