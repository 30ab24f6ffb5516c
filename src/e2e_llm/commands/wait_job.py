# SPDX-License-Identifier: Apache-2.0
"""Wait for a RayJob (STAGE train or batch) on KubeRay to succeed: exits 0 when its Ray job
SUCCEEDED, 3 with KubeRay's reason as soon as the RayJob has failed (for example
PreRunningDeadlineExceeded: a pod that could not be scheduled, pulled or admitted before
jobs.start_timeout_s) or when it did not end within --timeout seconds. ``kubectl wait`` on
``jobStatus`` would wait out the whole timeout on a failed job. (On Anyscale, ``anyscale job
wait`` does this.)

Usage: e2e-llm wait-job --stage train|batch [--env dev|prod] [--timeout 7200]
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_STUCK = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=("train", "batch"), required=True)
    parser.add_argument("--env", choices=("dev", "prod"), default="dev")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds before giving up (default 7200)")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between status reads")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.deploy import load_deploy
    from e2e_llm.env_tools import require_tool
    from e2e_llm.kuberay import run_command
    from e2e_llm.rollout_wait import RolloutStuck, rayjob_run, wait_until

    deploy = load_deploy()
    cmd = [require_tool("kubectl"), "get", "rayjob", f"{deploy.name}-{args.stage}", "-n",
           f"{deploy.name}-{args.env}", "-o", "json"]

    def check():
        return rayjob_run(json.loads(run_command(cmd).stdout))
    try:
        wait_until(check, timeout_s=args.timeout, poll_s=args.poll, what="job")
    except RolloutStuck as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STUCK
    return 0
