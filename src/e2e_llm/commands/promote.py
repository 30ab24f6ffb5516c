# SPDX-License-Identifier: Apache-2.0
"""Promote the candidate of the alias's unfinished canary rollout to stable now, skipping the
remaining steps and gates (recorded in the rollout log with --reason).

Example:
    e2e-llm promote --profile local --reason "verified by hand"
"""

from __future__ import annotations

import argparse
import sys

from e2e_llm.commands.canary import add_common, print_outcome


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--reason", default="manual promotion", help="recorded in the rollout log")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.canary import CanaryError
    from e2e_llm.canary_io import open_controller
    from e2e_llm.config import load_profile
    from e2e_llm.store import StoreError

    config = load_profile(args.profile)
    try:
        controller, _ = open_controller(config, policy_path=args.policy, alias=args.alias, for_gates=False)
        outcome = controller.promote(args.reason)
    except (CanaryError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_outcome(outcome, controller.policy.alias)
    return 0
