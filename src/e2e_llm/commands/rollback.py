# SPDX-License-Identifier: Apache-2.0
"""Adapter-level rollback of an alias: abort its unfinished canary rollout (candidate weight
back to 0), or, when the last rollout was promoted, point the alias back at the previous stable
version. Recorded in the rollout log. (Platform rollbacks: `make rollback TARGET=anyscale|k8s`.)

Example:
    e2e-llm rollback --profile local --reason "complaints about viggo-v3"
"""

from __future__ import annotations

import argparse
import sys

from e2e_llm.commands.canary import add_common, print_outcome


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--reason", default="manual rollback", help="recorded in the rollout log")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.canary import CanaryError
    from e2e_llm.canary_io import open_controller
    from e2e_llm.config import load_profile
    from e2e_llm.store import StoreError

    config = load_profile(args.profile)
    try:
        controller, _ = open_controller(config, policy_path=args.policy, alias=args.alias, for_gates=False)
        outcome = controller.rollback(args.reason)
    except (CanaryError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_outcome(outcome, controller.policy.alias)
    return 0
