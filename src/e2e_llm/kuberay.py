# SPDX-License-Identifier: Apache-2.0
"""Apply or roll back the serving app's KubeRay manifests (``k8s/overlays/<env>``) with kubectl:
the library calls behind the engine canary on KubeRay (``e2e_llm.engine_canary``), doing what
``make deploy-service TARGET=k8s`` and ``make rollback TARGET=k8s`` do.

- apply: ``kubectl apply --server-side -k k8s/overlays/<env>`` for the shared, serve and
  monitoring components (KubeRay's CRDs are too large for client-side apply);
- rollback: the ``k8s/`` tree of an earlier git revision, extracted to a temporary folder, and
  its serve component applied the same way.

``run`` executes one command list and returns the ``CompletedProcess`` (``subprocess.run`` with
``check=True`` by default; a recorder in tests).
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from e2e_llm.archives import extract_all

COMPONENT_LABEL = "app.kubernetes.io/component"
SERVICE_COMPONENTS = ("shared", "serve", "monitoring")
ROLLBACK_COMPONENTS = ("serve",)

Runner = Callable[[list[str]], subprocess.CompletedProcess]


def run_command(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def apply_command(overlay: Path, components: tuple[str, ...], kubectl: str = "kubectl") -> list[str]:
    return [kubectl, "apply", "--server-side", "-k", str(overlay), "-l",
            f"{COMPONENT_LABEL} in ({','.join(components)})"]


def apply_service(root: Path, env: str, *, kubectl: str = "kubectl", run: Runner = run_command) -> None:
    """Apply the environment's overlay (a new RayService spec starts the operator's upgrade)."""
    run(apply_command(Path(root) / "k8s" / "overlays" / env, SERVICE_COMPONENTS, kubectl))


def rollback_service(root: Path, env: str, rev: str, *, kubectl: str = "kubectl", run: Runner = run_command) -> None:
    """Re-apply the serve component of the manifests committed at git revision ``rev``."""
    with tempfile.TemporaryDirectory(prefix="e2e-llm-rollback-") as tmp:
        archive = Path(tmp) / "k8s.tar"
        run(["git", "-C", str(root), "archive", "--output", str(archive), rev, "k8s"])
        with tarfile.open(archive) as tar:
            extract_all(tar, tmp)
        run(apply_command(Path(tmp) / "k8s" / "overlays" / env, ROLLBACK_COMPONENTS, kubectl))
