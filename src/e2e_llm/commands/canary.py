# SPDX-License-Identifier: Apache-2.0
"""Roll a new adapter version out behind a serving alias, gated on quality and SLOs.

Publishes the candidate (a folder, training run id or `latest` is published on first use; a
published version id is used as is). Before any traffic every engine replica must load it and
answer one canary row (preflight) and it must pass the quality gate at 0% weight (shadow); a
candidate failing either is rejected and the alias is never changed. Then the alias's candidate
weight steps through the policy (configs/canary.yaml). At each step the canary set goes to
stable and candidate by version (quality gate) and the app's per-version metrics over the step
window are compared (SLO gate); every decision is appended to
<adapter store>/rollouts-<alias>.jsonl and printed. A failed gate rolls back; passing every step
promotes. Rerun after an interruption to continue (or roll back, per the policy's on_resume).

Examples:
    e2e-llm canary --profile local --adapter latest
    e2e-llm canary --profile local --adapter viggo-v3
    e2e-llm canary --profile local                 # resume an interrupted rollout
    e2e-llm canary --profile local --status
"""

from __future__ import annotations

import argparse
import sys
from enum import IntEnum

from e2e_llm.cli import CONFIG_ERROR, add_profile_argument


class Exit(IntEnum):
    """The exit status of `e2e-llm canary`: the one place these numbers are written."""

    PROMOTED = 0
    ERROR = 1
    CONFIG = CONFIG_ERROR
    ROLLED_BACK = 3
    INTERRUPTED = 130


# What each status means, in the words --help and the README use.
MEANING = {
    Exit.PROMOTED: "promoted (or --status printed)",
    Exit.ERROR: "the rollout could not start or continue",
    Exit.CONFIG: "invalid profile or policy",
    Exit.ROLLED_BACK: "rolled back or rejected before any traffic",
    Exit.INTERRUPTED: "interrupted (rerun to continue)",
}


def exit_codes_text() -> str:
    """The exit statuses as one sentence (--help, README)."""
    return "Exit status: " + ", ".join(f"{int(code)} {MEANING[code]}" for code in Exit) + \
        ". `make canary` exits 2 for any of these failures (GNU make's status for a failed recipe); " \
        f"the CLI's status is in make's last line (`make: *** [Makefile:N: canary] Error {int(Exit.ROLLED_BACK)}`)."


def outcome_code(outcome) -> Exit:
    return Exit.PROMOTED if outcome.result == "promoted" else Exit.ROLLED_BACK


def add_common(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--alias", help="alias to roll out behind (default: the policy's alias)")
    parser.add_argument("--policy", help="canary policy YAML (default: the profile's canary.policy)")


def _clients(text: str) -> int:
    """--synthetic-clients: the bounds of the profile's canary.synthetic_traffic.clients."""
    from pydantic import ValidationError

    from e2e_llm.config import SyntheticTraffic

    try:
        return SyntheticTraffic(clients=text).clients
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg']}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = exit_codes_text()
    add_common(parser)
    parser.add_argument("--adapter", help="candidate: published version id, <name>:latest, a trained adapter "
                                          "folder, a run id or 'latest'; omit to resume an unfinished rollout")
    parser.add_argument("--base-url", help="the app's OpenAI base URL (default: canary.base_url or serve host/port)")
    parser.add_argument("--metrics-url", action="append", default=[],
                        help="Prometheus endpoint to scrape (repeatable; default: Ray's metrics port)")
    parser.add_argument("--prometheus-url", help="Prometheus server to query instead of scraping")
    parser.add_argument("--on-resume", choices=("continue", "rollback"), help="override the policy's on_resume")
    parser.add_argument("--synthetic-clients", type=_clients, metavar="N",
                        help="clients calling the alias during each SLO window of an adapter canary (default: "
                             "the profile's canary.synthetic_traffic.clients; 0: only the users' traffic)")
    parser.add_argument("--status", action="store_true", help="print the latest rollout and exit")
    parser.add_argument("--any-instruction", action="store_true",
                        help="roll out a candidate trained with another instruction than the canary set asks with "
                             "(refused by default: the quality gate would judge the question, not the adapter); "
                             "the rollout's start record says so")
    engine = parser.add_argument_group("engine/infrastructure canary (new base model, vLLM or Ray version)")
    engine.add_argument("--platform", choices=("anyscale", "k8s"),
                        help="roll the rendered service out through the platform (Anyscale --canary-percent / "
                             "KubeRay incremental upgrade), SLO gate only, platform rollback on failure")
    engine.add_argument("--env", default="prod", choices=("dev", "prod"), help="deployment environment (default prod)")
    engine.add_argument("--rev", default="HEAD~1", help="k8s: git revision a rollback re-applies (default HEAD~1)")


def print_outcome(outcome, alias: str) -> None:
    if outcome.result == "promoted":
        print(f"PROMOTED: {outcome.candidate} is now the stable version of alias {alias!r} ({outcome.reason})")
    elif outcome.result == "rejected":
        print(f"REJECTED: {outcome.candidate} never got traffic; alias {alias!r} unchanged on {outcome.stable} "
              f"({outcome.reason})")
    elif outcome.result == "reverted":
        print(f"REVERTED: alias {alias!r} is back on {outcome.stable} ({outcome.reason})")
    else:
        print(f"ROLLED BACK: alias {alias!r} stays on {outcome.stable}; {outcome.candidate} gets no traffic "
              f"({outcome.reason})")


def run_manual(args: argparse.Namespace, action: str) -> int:
    """`e2e-llm promote` / `e2e-llm rollback`: a human decision on the alias's rollout, logged."""
    from e2e_llm.canary import CanaryError
    from e2e_llm.canary_io import open_controller
    from e2e_llm.config import load_profile
    from e2e_llm.store import StoreError

    config = load_profile(args.profile)
    try:
        controller, _ = open_controller(config, policy_path=args.policy, alias=args.alias, for_gates=False)
        outcome = getattr(controller, action)(args.reason)
    except (CanaryError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Exit.ERROR
    print_outcome(outcome, controller.policy.alias)
    return Exit.PROMOTED


def run(args: argparse.Namespace) -> int:
    from e2e_llm.canary import CanaryError, format_rollout
    from e2e_llm.canary_io import instruction_mismatch, open_controller, resolve_candidate
    from e2e_llm.config import load_profile
    from e2e_llm.store import StoreError

    config = load_profile(args.profile)
    if args.platform:
        return run_engine(config, args)
    controller = None
    try:
        controller, store = open_controller(
            config, policy_path=args.policy, alias=args.alias, base_url=args.base_url,
            metrics_urls=args.metrics_url, prometheus_url=args.prometheus_url, on_resume=args.on_resume,
            for_gates=not args.status, synthetic_clients=args.synthetic_clients)
        if args.status:
            rollout = controller.current()
            print(format_rollout(rollout) if rollout else f"no rollouts recorded for alias {controller.policy.alias!r}")
            return Exit.PROMOTED
        candidate, start_fields = None, {}
        if args.adapter:
            candidate, published = resolve_candidate(config, store, args.adapter)
            if published:
                print(f"published {args.adapter} as {candidate} at {store.adapter_uri(candidate)}", flush=True)
            if problem := instruction_mismatch(store, candidate, controller.rows, controller.task):
                if not args.any_instruction:
                    raise CanaryError(problem)
                print(f"warning (--any-instruction): {problem}", file=sys.stderr)
                start_fields["instruction_mismatch"] = problem
        outcome = controller.run(candidate, **start_fields)
    except (CanaryError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Exit.ERROR
    except KeyboardInterrupt:
        rollout = controller.current() if controller is not None else None
        where = f"rollout {rollout.id} stopped after '{rollout.effective_last['event']}'" if rollout else "stopped"
        print(f"interrupted: {where}; rerun `e2e-llm canary` to continue, or `e2e-llm rollback`", file=sys.stderr)
        return Exit.INTERRUPTED
    rollout = controller.current()
    print(format_rollout(rollout))
    print_outcome(outcome, controller.policy.alias)
    return outcome_code(outcome)


def run_engine(config, args: argparse.Namespace) -> int:
    from e2e_llm.canary import CanaryError, format_rollout
    from e2e_llm.engine_canary import CANARY, open_engine_controller
    from e2e_llm.rollout_wait import RolloutStuck

    try:
        controller = open_engine_controller(config, platform=args.platform, env=args.env, rev=args.rev,
                                            policy_path=args.policy, prometheus_url=args.prometheus_url)
        if args.status:
            rollout = controller.current()
            print(format_rollout(rollout) if rollout else f"no rollouts recorded for {controller.policy.alias!r}")
            return Exit.PROMOTED
        try:
            outcome = controller.run(None if controller.current() and not controller.current().finished else CANARY)
        except RolloutStuck as exc:
            # The platform did not run a step (failed, or no end before the timeout): undo it.
            print(f"error: {exc}; rolling back", file=sys.stderr, flush=True)
            outcome = controller.rollback(f"rollout stuck: {exc}")
            print(format_rollout(controller.current()))
            print_outcome(outcome, controller.policy.alias)
            return Exit.ROLLED_BACK
    except CanaryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return Exit.ERROR
    print(format_rollout(controller.current()))
    print_outcome(outcome, controller.policy.alias)
    return outcome_code(outcome)
