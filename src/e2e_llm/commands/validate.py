# SPDX-License-Identifier: Apache-2.0
"""Run the offline validation ladder on the committed deployment files: render drift,
yamllint, `kubectl kustomize` of every overlay, KubeRay CRD schema (unknown fields rejected)
and CEL rules, the operator's reconcile-time rules, serveConfigV2 through Ray Serve's schema
with every import_path imported, core objects with kubernetes-validate --strict, the Anyscale
YAMLs through the SDK, no secret values or unpinned images, and the Containerfiles.
Exits 1 listing every problem, each naming its file or object and field.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shared", help="folder holding k8s/crds (default: $E2E_LLM_SHARED or ../shared)")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import project_root
    from e2e_llm.validate import validate_all

    root = project_root()
    shared = Path(args.shared or os.environ.get("E2E_LLM_SHARED") or root.parent / "shared").resolve()
    report = validate_all(root, shared)
    failed = 0
    for step, problems in report.items():
        print(f"{'FAIL' if problems else 'ok  '} {step}" + (f" ({len(problems)})" if problems else ""))
        for problem in problems:
            print(f"     {problem}")
        failed += len(problems)
    return 1 if failed else 0
