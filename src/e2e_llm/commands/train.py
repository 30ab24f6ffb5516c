# SPDX-License-Identifier: Apache-2.0
"""LoRA SFT with LLaMA-Factory on Ray Train for a profile.

Rerunning with the --run-id of an interrupted run resumes from its latest checkpoint.
Overrides (--set key=value) are for smoke runs; recipes stay the source of truth.
"""

from __future__ import annotations

import argparse
import json
import sys

from e2e_llm.cli import add_profile_argument, ray_temp_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--run-id", help="run id (default: the UTC start time and 4 random hex digits); reuse one "
                                         "to resume it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a LLaMA-Factory recipe key, e.g. --set max_samples=32")
    parser.add_argument("--ray-temp-dir", type=ray_temp_dir, help="temp dir for a Ray instance started by this command")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import load_profile
    from e2e_llm.train import TrainError, TrainInterrupted, parse_overrides, run_training

    config = load_profile(args.profile)
    try:
        manifest = run_training(config, run_id=args.run_id, overrides=parse_overrides(args.overrides),
                                ray_temp_dir=args.ray_temp_dir)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, TrainInterrupted) else 1
    m = manifest["metrics"]
    print(json.dumps({"run_id": manifest["run_id"], "adapter": manifest["adapter_uri"], **m}, indent=2))
    return 0
