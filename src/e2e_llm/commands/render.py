# SPDX-License-Identifier: Apache-2.0
"""Render the deployment files from configs/ (configs/deploy.yaml and the profile it names):
jobs/*.yaml and services/llm.yaml for Anyscale, k8s/base and k8s/components for KubeRay.
With --check, write nothing and exit 1 listing every file that differs from a fresh render.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deploy-config", help="deployment settings (default: configs/deploy.yaml)")
    parser.add_argument("--output", help="write under this folder instead of the project root")
    parser.add_argument("--check", action="store_true", help="exit 1 if committed files drifted from configs/")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import project_root
    from e2e_llm.deploy import load_deploy
    from e2e_llm.render import check, render_files, write

    root = project_root()
    files = render_files(load_deploy(args.deploy_config, root=root))
    target = Path(args.output).resolve() if args.output else root
    if args.check:
        drifted = check(files, target)
        if drifted:
            print("rendered files drifted from configs/ (run `make render` and commit):", file=sys.stderr)
            for rel in drifted:
                print(f"  {rel}", file=sys.stderr)
            return 1
        print(f"{len(files)} rendered files match configs/")
        return 0
    changed = write(files, target)
    print(f"rendered {len(files)} files under {target} ({len(changed)} changed)")
    for rel in changed:
        print(f"  {rel}")
    return 0
