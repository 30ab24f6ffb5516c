# SPDX-License-Identifier: Apache-2.0
"""Promote the candidate of the alias's unfinished canary rollout to stable now, skipping the
remaining steps and gates (recorded in the rollout log with --reason).

Example:
    e2e-llm promote --profile local --reason "verified by hand"
"""

from __future__ import annotations

import argparse

from e2e_llm.commands.canary import add_common, run_manual


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--reason", default="manual promotion", help="recorded in the rollout log")


def run(args: argparse.Namespace) -> int:
    return run_manual(args, "promote")
