# SPDX-License-Identifier: Apache-2.0
"""Adapter-level rollback of an alias: abort its unfinished canary rollout (candidate weight
back to 0), or, when the last rollout was promoted, point the alias back at the previous stable
version. Recorded in the rollout log. (Platform rollbacks: `make rollback TARGET=anyscale|k8s`.)

Example:
    e2e-llm rollback --profile local --reason "complaints about viggo-v3"
"""

from __future__ import annotations

import argparse

from e2e_llm.commands.canary import add_common, run_manual


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--reason", default="manual rollback", help="recorded in the rollout log")


def run(args: argparse.Namespace) -> int:
    return run_manual(args, "rollback")
