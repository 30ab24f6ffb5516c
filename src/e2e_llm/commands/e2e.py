# SPDX-License-Identifier: Apache-2.0
"""The whole local pipeline, readable: data, model, train, batch (adapter, and the base model
once per rows/engine), serve, then a summary table. Full logs: <storage>/e2e/<run id>/.

Usage (what `make e2e` runs, from the serve environment):
    e2e-llm e2e --profile local --rows 100 --train-cli .venv/train/bin/e2e-llm --serve-cli .venv/serve/bin/e2e-llm
"""

from __future__ import annotations

import argparse
import shutil

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from e2e_llm.e2e import DEFAULT_ROWS

    add_profile_argument(parser)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help=f"score the first N val rows (0: all of val; default {DEFAULT_ROWS})")
    parser.add_argument("--train-cli", default=shutil.which("e2e-llm") or "e2e-llm",
                        help="e2e-llm of the train environment (LLaMA-Factory)")
    parser.add_argument("--serve-cli", default=shutil.which("e2e-llm") or "e2e-llm",
                        help="e2e-llm of the serve environment (vLLM)")
    parser.add_argument("--run-id", help="run id (default: the UTC start time and 4 random hex digits)")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import load_profile
    from e2e_llm.e2e import run_e2e, summary, write_summary

    config = load_profile(args.profile)
    rows = args.rows or None
    result = run_e2e(config, train_cli=args.train_cli, serve_cli=args.serve_cli, rows=rows, profile=args.profile,
                     run_id=args.run_id)
    text = summary(result, config, rows, args.profile)
    print(text, flush=True)
    write_summary(result, text, config.storage_kw())
    return 0 if result.ok else 1
