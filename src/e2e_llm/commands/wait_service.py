# SPDX-License-Identifier: Apache-2.0
"""Wait for the service rollout's real end on TARGET/ENV: KubeRay, the RayService upgrade has
finished on the applied spec (not just Ready on the old cluster: UpgradeInProgress false, no
pending cluster, every application RUNNING, the active cluster on the rendered image);
Anyscale, the service RUNNING on a new primary version with no canary left. Exits 0 when done,
3 with the reason when the rollout failed or did not end within --timeout seconds.

Usage: e2e-llm wait-service --target anyscale|k8s [--env dev|prod] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

EXIT_STUCK = 3


def add_wait_arguments(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    """--env, --timeout, --poll: shared with ``e2e-llm wait-job``."""
    parser.add_argument("--env", choices=("dev", "prod"), default="dev")
    parser.add_argument("--timeout", type=float, default=timeout_s,
                        help=f"seconds before giving up (default {timeout_s:.0f})")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between status reads")


def wait_exit_code(check, args: argparse.Namespace, what: str = "rollout") -> int:
    """0 once ``check`` says done; EXIT_STUCK with the reason on stderr when it failed or timed out.
    A kubectl call that fails is a status line, not a traceback: the object gone (NotFound) ends
    the wait, anything else (the API server busy for a moment) is tried again at the next poll."""
    from e2e_llm.rollout_wait import Check, RolloutStuck, wait_until

    def guarded() -> Check:
        try:
            return check()
        except subprocess.CalledProcessError as exc:
            lines = (exc.stderr or "").strip().splitlines() or [f"exit status {exc.returncode}"]
            command = " ".join(str(part) for part in exc.cmd[1:4])
            return Check(False, f"kubectl {command}: {lines[-1]}", failed="(NotFound)" in lines[-1])
    try:
        wait_until(guarded, timeout_s=args.timeout, poll_s=args.poll, what=what)
    except RolloutStuck as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STUCK
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=("anyscale", "k8s"), required=True)
    add_wait_arguments(parser, 1800.0)


def run(args: argparse.Namespace) -> int:
    from e2e_llm.deploy import load_deploy
    from e2e_llm.engine_canary import KubeRayPlatform
    from e2e_llm.rollout_wait import anyscale_rollout

    deploy = load_deploy()
    name = f"{deploy.name}-{args.env}"
    if args.target == "k8s":
        platform = KubeRayPlatform(name=deploy.name, namespace=name, env=args.env, image=deploy.image_ref("serve"))
        check = platform.upgrade
    else:
        import anyscale

        def check():
            return anyscale_rollout(anyscale.service.status(name=name))
    return wait_exit_code(check, args)
