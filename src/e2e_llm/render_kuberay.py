# SPDX-License-Identifier: Apache-2.0
"""The KubeRay side of ``e2e_llm.render``: the RayJob/RayService manifests, their pods (what
every pod runs as, pulls with and may do, the RayJob submitter's included), the shared volume,
the service account, the kustomize files and the canary and monitoring components."""

from __future__ import annotations

import copy
import json
from typing import Any

from e2e_llm.config import PipelineConfig
from e2e_llm.deploy import DeployConfig
from e2e_llm.render_common import (
    COMPONENT_LABEL,
    PART_OF,
    dump,
    entrypoint,
    serve_application,
    stage_env,
    stage_image,
    worker_group,
)

GPU_RESOURCE = "nvidia.com/gpu"
# Every Ray pod meets the Pod Security Standard "restricted", which the overlays' namespaces
# enforce; e2e_llm.validate_pod_security checks each pod KubeRay makes from these templates,
# its own containers included. The images run as rayproject/ray's user (USER 1000, checked by
# check_containerfile), whose group is "users" (100): fsGroup gives it the shared volume (on
# OpenShift, which assigns its own, k8s/components/openshift removes it: e2e_llm.render_openshift).
RAY_USER_GROUP = 100
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "fsGroup": RAY_USER_GROUP, "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# The RayJob submitter only runs `ray job submit` and follows the logs (KubeRay's own default).
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "500m", "memory": "1Gi"}}



def _metadata(deploy: DeployConfig, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": {
        "app.kubernetes.io/name": deploy.name,
        "app.kubernetes.io/part-of": PART_OF,
        COMPONENT_LABEL: component,
    }}


def _env(deploy: DeployConfig, config: PipelineConfig, stage: str) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in stage_env(deploy, config, stage).items()]
    hf = deploy.secrets.hf_token
    env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf.name, "key": hf.key, "optional": True}}})
    if stage == "serve" and config.serve.auth.enabled:  # the app's key, from its Secret
        key = deploy.secrets.api_key
        env.append({"name": config.serve.auth.api_key_env,
                    "valueFrom": {"secretKeyRef": {"name": key.name, "key": key.key}}})
    return env


def _resources(cpu: int, memory: str, gpu: int = 0) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(cpu), "memory": memory}
    if gpu:
        amounts[GPU_RESOURCE] = str(gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod_identity(deploy: DeployConfig) -> dict[str, Any]:
    """What every pod of the bundle runs as and pulls with (Ray nodes and the RayJob submitter)."""
    spec: dict[str, Any] = {"serviceAccountName": deploy.name}
    if deploy.secrets.registry.kubernetes:
        spec["imagePullSecrets"] = [{"name": deploy.secrets.registry.kubernetes}]
    spec["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
    return spec


def _container_security() -> dict[str, Any]:
    return copy.deepcopy(CONTAINER_SECURITY_CONTEXT)


def _node_selector(deploy: DeployConfig, image: str, accelerator: str | None = None) -> dict[str, str]:
    """Linux nodes of the machine ``image`` (train/serve) is built for, and the accelerator's. A pod
    without it may land on an arm64 node of a mixed cluster (Graviton node pools, Karpenter picking
    the cheapest) and fail there with "exec format error"."""
    selector = {"kubernetes.io/os": "linux", "kubernetes.io/arch": deploy.image(image).kubernetes_arch}
    if accelerator:
        selector |= deploy.accelerators[accelerator].node_selector
    return selector


def _pod(deploy: DeployConfig, config: PipelineConfig, stage: str, container: str, image: str,
         resources: dict[str, Any], shm: str | None = None, accelerator: str | None = None,
         gpu: bool = False) -> dict[str, Any]:
    mounts = [{"name": "shared", "mountPath": deploy.storage.mount_path}]
    volumes: list[dict[str, Any]] = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": deploy.storage.volume.claim_name}},
    ]
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
    spec = _pod_identity(deploy)
    spec |= {
        "containers": [{
            "name": container,
            "image": image,
            "imagePullPolicy": deploy.images.pull_policy,
            "resources": resources,
            "env": _env(deploy, config, stage),
            "envFrom": [{"secretRef": {"name": deploy.secrets.aws.name, "optional": True}}],
            "volumeMounts": mounts,
            "securityContext": _container_security(),
        }],
        "volumes": volumes,
    }
    spec["nodeSelector"] = _node_selector(deploy, stage_image(stage), accelerator)
    if gpu:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def ray_cluster_spec(deploy: DeployConfig, config: PipelineConfig, stage: str) -> dict[str, Any]:
    image = getattr(deploy.images, stage_image(stage))
    ref = deploy.image_ref(stage_image(stage))
    group = worker_group(deploy, config, stage)
    head = deploy.compute.head
    worker: dict[str, Any] = {
        "groupName": group.group_name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": _pod(deploy, config, stage, "ray-worker", ref,
                         _resources(group.cpu, group.size.memory, group.gpu),
                         shm=group.size.shm, accelerator=group.accelerator if group.gpu else None,
                         gpu=bool(group.gpu)),
    }
    spec: dict[str, Any] = {
        "rayVersion": image.ray_version,
        # Ray >= 2.52 turns token authentication on; KubeRay creates and wires the token.
        "authOptions": {"mode": "token"},
    }
    if group.min_replicas != group.max_replicas:
        spec |= in_tree_autoscaling()
    spec["headGroupSpec"] = {
        # The head schedules no work: drivers, the Serve controller and proxies only.
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod(deploy, config, stage, "ray-head", ref, _resources(head.cpu, head.memory),
                         shm=head.shm),
    }
    spec["workerGroupSpecs"] = [worker]
    return spec


def in_tree_autoscaling() -> dict[str, Any]:
    """The cluster keys that turn on Ray's autoscaler: KubeRay adds it as a container of the
    head pod, whose securityContext comes from autoscalerOptions alone."""
    return {"enableInTreeAutoscaling": True, "autoscalerOptions": {"securityContext": _container_security()}}


def submitter_template(deploy: DeployConfig, stage: str) -> dict[str, Any]:
    """The RayJob submitter's pod (K8sJobMode). KubeRay's default one has the head's image but not
    its pull secret, service account or securityContext: it could not pull a private image, and
    a namespace enforcing "restricted" refuses it. KubeRay fills in the command and environment."""
    spec = _pod_identity(deploy)
    spec |= {
        "restartPolicy": "Never",
        "containers": [{
            "name": "ray-job-submitter",
            "image": deploy.image_ref(stage_image(stage)),
            "imagePullPolicy": deploy.images.pull_policy,
            "resources": copy.deepcopy(SUBMITTER_RESOURCES),
            "securityContext": _container_security(),
        }],
        "nodeSelector": _node_selector(deploy, stage_image(stage)),
    }
    return {"spec": spec}


def rayjob(deploy: DeployConfig, config: PipelineConfig, stage: str) -> dict[str, Any]:
    jobs = deploy.jobs
    submitter = {"submitterPodTemplate": submitter_template(deploy, stage)} \
        if jobs.submission_mode == "K8sJobMode" else {}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(deploy, f"{deploy.name}-{stage}", stage),
        "spec": {
            "entrypoint": entrypoint(deploy, stage),
            "submissionMode": jobs.submission_mode,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": jobs.ttl_seconds_after_finished,
            "activeDeadlineSeconds": jobs.timeout_s,
            "preRunningDeadlineSeconds": jobs.start_timeout_s,
            "backoffLimit": jobs.max_retries,
            **submitter,
            "rayClusterSpec": ray_cluster_spec(deploy, config, stage),
        },
    }


def serve_config_v2(config: PipelineConfig) -> str:
    return dump({"applications": [serve_application(config)]})


def rayservice(deploy: DeployConfig, config: PipelineConfig) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(deploy, deploy.name, "serve"),
        "spec": {
            "serveConfigV2": serve_config_v2(config),
            "rayClusterConfig": ray_cluster_spec(deploy, config, "serve"),
        },
    }


def service_account(deploy: DeployConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(deploy, deploy.name, "shared")}


def shared_volume(deploy: DeployConfig) -> dict[str, Any]:
    volume = deploy.storage.volume
    spec: dict[str, Any] = {"accessModes": [volume.access_mode], "resources": {"requests": {"storage": volume.size}}}
    if volume.storage_class:
        spec["storageClassName"] = volume.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(deploy, volume.claim_name, "shared"), "spec": spec}


def canary_patch(deploy: DeployConfig) -> dict[str, Any]:
    canary = deploy.service.canary
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": deploy.name},
        "spec": {
            "upgradeStrategy": {
                "type": "NewClusterWithIncrementalUpgrade",
                "clusterUpgradeOptions": {
                    "stepSizePercent": canary.step_size_percent,
                    "intervalSeconds": canary.interval_seconds,
                    "maxSurgePercent": canary.max_surge_percent,
                    "gatewayClassName": canary.gateway_class_name,
                },
            },
            # Incremental upgrades scale the new cluster up step by step: the in-tree
            # autoscaler is required (KubeRay rejects the spec without it).
            "rayClusterConfig": in_tree_autoscaling(),
        },
    }


def dashboard_configmap(deploy: DeployConfig) -> dict[str, Any]:
    from e2e_llm.monitoring import grafana_dashboard

    dashboard = grafana_dashboard()
    metadata = _metadata(deploy, f"{deploy.name}-grafana-dashboard", "monitoring")
    metadata["labels"]["grafana_dashboard"] = "1"  # Grafana's dashboard sidecar loads these
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": {f"{dashboard['uid']}.json": json.dumps(dashboard, indent=2, sort_keys=True) + "\n"},
    }


def kustomization(resources: list[str], component: bool = False) -> dict[str, Any]:
    if component:
        return {"apiVersion": "kustomize.config.k8s.io/v1alpha1", "kind": "Component", "resources": resources}
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}


def pod_monitor(deploy: DeployConfig, config: PipelineConfig) -> dict[str, Any]:
    from e2e_llm.monitoring import pod_monitor

    doc = pod_monitor(config)
    labels = _metadata(deploy, doc["metadata"]["name"], "monitoring")["labels"]
    doc["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), **labels}
    return doc
