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

from e2e_llm.commands.wait_service import add_wait_arguments, wait_exit_code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", choices=("train", "batch"), required=True)
    add_wait_arguments(parser, 7200.0)


def run(args: argparse.Namespace) -> int:
    from e2e_llm.deploy import load_deploy
    from e2e_llm.env_tools import require_tool
    from e2e_llm.kuberay import run_command
    from e2e_llm.rollout_wait import rayjob_run

    deploy = load_deploy()
    cmd = [require_tool("kubectl"), "get", "rayjob", f"{deploy.name}-{args.stage}", "-n",
           f"{deploy.name}-{args.env}", "-o", "json"]

    def check():
        return rayjob_run(json.loads(run_command(cmd).stdout))
    return wait_exit_code(check, args, what="job")
