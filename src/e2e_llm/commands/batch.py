# SPDX-License-Identifier: Apache-2.0
"""Batch inference with ray.data.llm (vLLM) over a split, then evaluation.

Usage:
    e2e-llm batch --profile local --adapter latest --split val [--limit N]
    e2e-llm batch --adapter none --split test            # the base model
    e2e-llm batch --adapter runs/<id>/adapter --mode lora --split my_rows.jsonl

Writes <storage>/batch/<run id>/ with predictions.jsonl (every input column + generated_text,
token counts, error), metrics.json, report.md, metrics.png and manifest.json, and prints the
metrics table. Rows in = rows out: bad rows and engine failures are rows with an error.
"""

from __future__ import annotations

import argparse
import sys

from e2e_llm.cli import INTERRUPTED, add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--adapter", default="latest",
                        help="run id, adapter path, 'latest' (newest completed training run), "
                             "store:<alias|id> (published adapter), or 'none'")
    parser.add_argument("--split", help="split name (val, test) or a .jsonl path/URI (default: batch.split)")
    parser.add_argument("--limit", type=int, help="only the first N rows")
    parser.add_argument("--mode", choices=("merged", "lora"),
                        help="how the adapter is applied (default: batch.adapter_mode)")
    structured = parser.add_mutually_exclusive_group()
    structured.add_argument("--structured", dest="structured", action="store_true", default=None,
                            help="constrain decoding to the task grammar (default: batch.structured_output)")
    structured.add_argument("--no-structured", dest="structured", action="store_false")
    parser.add_argument("--any-instruction", action="store_true",
                        help="score an adapter on rows asking with another instruction than its training rows "
                             "did (refused otherwise: its scores there are not its own)")
    parser.add_argument("--run-id", help="output folder name under <storage>/batch (default: time-split-adapter-mode)")
    parser.add_argument("--output", help="output folder or URI (default: <storage>/batch/<run id>)")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.batch import BatchError, run_batch
    from e2e_llm.config import load_profile
    from e2e_llm.evaluate import compare, metrics_table
    from e2e_llm.model import ModelError

    config = load_profile(args.profile)
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        result = run_batch(config, split=args.split, adapter_ref=args.adapter, mode=args.mode,
                           structured=args.structured, limit=args.limit, run_id=args.run_id, out_uri=args.output,
                           any_instruction=args.any_instruction)
    except (BatchError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # results are written once every row is back: there is nothing to resume
        print("error: interrupted; no results were written (a rerun starts over)", file=sys.stderr)
        return INTERRUPTED
    m = result.manifest
    rows = m["rows"]
    print(f"rows in {rows['in']} = out {rows['out']} (errors: {rows['errors']}, of which invalid input "
          f"{rows['invalid_input']}, engine {rows['engine_errors']}; cut off at max_tokens: {rows['truncated']}); "
          f"{m['timing']['rows_per_s']} rows/s")
    if result.metrics:
        print(metrics_table(result.metrics, compare(result.metrics, result.previous) if result.previous else None))
    else:
        print("no metrics: not every readable row has a reference (`output`); predictions written")
    print(f"written: {result.out_uri}")
    return 0
