# SPDX-License-Identifier: Apache-2.0
"""Render every deployment file from ``configs/`` alone: Anyscale job and service YAMLs and
the KubeRay kustomize base and components.

One source, two targets: the job entrypoint string, the environment and the Serve
application block (``import_path: e2e_llm.serve:build_app`` with ``args`` from
``e2e_llm.serve.app_args``) are built once (``e2e_llm.render_common``) and written into both
the Anyscale YAMLs (here) and the RayJob/RayService manifests (``e2e_llm.render_kuberay``).
``rayVersion`` comes from the image tag. Each file starts with ``render_common.HEADER``;
``check()`` lists the committed files that differ from a fresh render (the drift test and
``make check-render``).

Usage:
    files = render_files(load_deploy())     # {relative path: text}
    write(files, root)                       # make render
    drifted = check(files, root)             # make check-render
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e_llm.config import PipelineConfig
from e2e_llm.deploy import DeployConfig
from e2e_llm.render_common import (
    APP_DIR,
    PART_OF,
    Group,
    document,
    entrypoint,
    serve_application,
    stage_env,
    stage_image,
    worker_group,
)
from e2e_llm.render_kuberay import (
    canary_patch,
    dashboard_configmap,
    kustomization,
    pod_monitor,
    rayjob,
    rayservice,
    service_account,
    shared_volume,
)
from e2e_llm.render_openshift import openshift_patches

# Directories fully owned by render: a file there that render does not produce is drift.
RENDERED_DIRS = ("jobs", "services", "k8s/base", "k8s/components")


# ---------------------------------------------------------------------------------------
# Anyscale


def _anyscale_compute(deploy: DeployConfig, group: Group) -> dict[str, Any]:
    head = deploy.compute.head
    worker: dict[str, Any] = {"CPU": group.cpu, "memory": group.size.memory}
    if group.gpu:
        worker["GPU"] = group.gpu
        if group.accelerator:
            worker["accelerator"] = deploy.accelerators[group.accelerator].anyscale
    compute: dict[str, Any] = {
        "head_node": {"required_resources": {"CPU": head.cpu, "memory": head.memory}},
        "worker_nodes": [{
            "name": group.group_name,
            "required_resources": worker,
            "min_nodes": group.min_replicas,
            "max_nodes": group.max_replicas,
        }],
    }
    if deploy.anyscale.cloud:
        compute["cloud"] = deploy.anyscale.cloud
    return compute


def _anyscale_common(deploy: DeployConfig, config: PipelineConfig, image: str, group: Group) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "image_uri": image,
        "compute_config": _anyscale_compute(deploy, group),
        "working_dir": f"local://{APP_DIR}",
        "env_vars": stage_env(deploy, config, group.name),
        "tags": {"app": PART_OF, "stage": group.name},
    }
    for key in ("cloud", "project"):
        if value := getattr(deploy.anyscale, key):
            doc[key] = value
    if deploy.secrets.registry.anyscale:
        doc["registry_login_secret"] = deploy.secrets.registry.anyscale
    return doc


def anyscale_job(deploy: DeployConfig, config: PipelineConfig, stage: str) -> dict[str, Any]:
    image = deploy.image_ref(stage_image(stage))
    return {
        "name": f"{deploy.name}-{stage}",
        "entrypoint": entrypoint(deploy, stage),
        **_anyscale_common(deploy, config, image, worker_group(deploy, config, stage)),
        "max_retries": deploy.jobs.max_retries,
        "timeout_s": deploy.jobs.timeout_s,
    }


def anyscale_service(deploy: DeployConfig, config: PipelineConfig) -> dict[str, Any]:
    return {
        "name": deploy.name,
        **_anyscale_common(deploy, config, deploy.image_ref("serve"), worker_group(deploy, config, "serve")),
        "query_auth_token_enabled": deploy.service.query_auth_token_enabled,
        "applications": [serve_application(config)],
    }


# ---------------------------------------------------------------------------------------
# All files


def render_files(deploy: DeployConfig) -> dict[str, str]:
    """Every rendered file, by path relative to the project root."""
    config = deploy.pipeline()
    files = {
        "jobs/train.yaml": document(anyscale_job(deploy, config, "train"),
                                    "Anyscale job: LoRA SFT. Usage: make train TARGET=anyscale"),
        "jobs/batch.yaml": document(anyscale_job(deploy, config, "batch"),
                                    "Anyscale job: batch evaluation. Usage: make batch TARGET=anyscale"),
        "services/llm.yaml": document(anyscale_service(deploy, config),
                                      "Anyscale service: OpenAI-compatible LLM + LoRA adapters. "
                                      "Usage: make deploy-service TARGET=anyscale [CANARY_PERCENT=10]"),
    }
    base = {
        "serviceaccount.yaml": (service_account(deploy), "ServiceAccount the Ray pods run as."),
        "pvc.yaml": (shared_volume(deploy), "Shared volume: Hugging Face cache and scratch for every stage."),
        "rayjob-train.yaml": (rayjob(deploy, config, "train"), "RayJob: LoRA SFT. Usage: make train TARGET=k8s"),
        "rayjob-batch.yaml": (rayjob(deploy, config, "batch"),
                              "RayJob: batch evaluation. Usage: make batch TARGET=k8s"),
        "rayservice-llm.yaml": (rayservice(deploy, config),
                                ("RayService: OpenAI-compatible LLM + LoRA adapters. "
                                "Usage: make deploy-service TARGET=k8s")),
    }
    for name, (doc, purpose) in base.items():
        files[f"k8s/base/{name}"] = document(doc, purpose)
    files["k8s/base/kustomization.yaml"] = document(
        kustomization(list(base)), "KubeRay base; environments patch it in k8s/overlays/<env>.")
    files["k8s/components/canary/upgrade-strategy.yaml"] = document(
        canary_patch(deploy), "Patch: incremental (canary) upgrades of the RayService through Gateway API.")
    files["k8s/components/canary/kustomization.yaml"] = document(
        {**kustomization([], component=True), "patches": [{"path": "upgrade-strategy.yaml"}]},
        "Component: RayService NewClusterWithIncrementalUpgrade. Usage: components: [../../components/canary]")
    files["k8s/components/openshift/kustomization.yaml"] = document(
        {**kustomization([], component=True), "patches": openshift_patches([doc for doc, _ in base.values()])},
        "Component: Ray pods OpenShift's restricted-v2 SCC admits (no fsGroup of our own). "
        "Usage: components: [../../components/openshift]")
    files["k8s/components/monitoring/podmonitor.yaml"] = document(
        pod_monitor(deploy, config), "Prometheus Operator PodMonitor for Ray metrics of every Ray pod.")
    files["k8s/components/monitoring/grafana-dashboard.yaml"] = document(
        dashboard_configmap(deploy), "Grafana dashboard (sidecar-loaded ConfigMap): traffic, latency, tokens.")
    files["k8s/components/monitoring/kustomization.yaml"] = document(
        kustomization(["podmonitor.yaml", "grafana-dashboard.yaml"], component=True),
        "Component: Prometheus scraping + Grafana dashboard. Usage: components: [../../components/monitoring]")
    return files

def write(files: dict[str, str], root: Path) -> list[str]:
    """Write the files under ``root``; remove stale files in rendered folders. Returns changed paths."""
    changed = []
    for rel, text in files.items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
    for rel in _stale(files, root):
        (root / rel).unlink()
        changed.append(rel)
    return changed


def _stale(files: dict[str, str], root: Path) -> list[str]:
    stale = []
    for folder in RENDERED_DIRS:
        for path in sorted((root / folder).rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in files and path.name != ".gitkeep":
                stale.append(rel)
    return stale


def check(files: dict[str, str], root: Path) -> list[str]:
    """Paths whose committed content differs from ``files`` (missing, changed or stale)."""
    drifted = [rel for rel, text in files.items()
               if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text]
    return drifted + _stale(files, root)
