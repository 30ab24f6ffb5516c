# SPDX-License-Identifier: Apache-2.0
"""Evaluate a results file alone (JSONL or Parquet, a file or a folder of parts, local or
object storage): strict exact match, function accuracy, slot precision/recall/F1, valid-MR
rate, per-function figures and the worst errors. Writes metrics.json, report.md and
metrics.png beside the results (a batch run's predictions: into <run>/evaluate/, the run's own
files stay; or into --output) and prints the metrics table. A batch run's predictions are scored
with the task it was run for: another profile's task is an error.

Rows need a prediction (``prediction`` or ``generated_text``) and a reference (``reference``
or ``output``); ``input`` is shown in the worst errors; rows with an ``error`` count as wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--results", required=True, help="results file or folder (.jsonl/.parquet; path or URI)")
    parser.add_argument("--output", help="folder for metrics.json, report.md, metrics.png (default: beside results)")
    parser.add_argument("--previous", help="previous metrics.json or run manifest to compare with")
    parser.add_argument("--worst", type=int, default=10, help="how many worst rows to list (default 10)")


def run(args: argparse.Namespace) -> int:
    from e2e_llm import storage
    from e2e_llm.batch.manifest import batch_run_beside
    from e2e_llm.config import load_profile
    from e2e_llm.evaluate import (
        EvaluationError,
        compare,
        evaluate_rows,
        load_previous,
        metrics_table,
        read_results,
        write_reports,
    )

    config = load_profile(args.profile)
    task = config.task_schema()
    results = args.results
    if results.endswith((".jsonl", ".json", ".parquet")):
        folder = results.rsplit("/", 1)[0] if storage.is_remote(results) else str(Path(results).resolve().parent)
    else:
        folder = results
    try:
        run = batch_run_beside(folder)
        scored_by = ((run or {}).get("task") or {}).get("name")
        if scored_by and scored_by != task.name:
            raise EvaluationError(f"{results}: predictions of a batch run for task {scored_by!r} (profile "
                                  f"{run.get('profile')!r}); this profile's task is {task.name!r}: pass that "
                                  "run's --profile")
        rows = read_results(results)
        metrics = evaluate_rows(task, rows, source=results, worst_k=args.worst)
        previous = load_previous(args.previous) if args.previous else None
    except EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # A batch run's own metrics, report and chart stay as the run wrote them.
    out_dir = args.output or (storage.join(folder, "evaluate") if run else folder)
    paths = write_reports(metrics, out_dir, title=f"Evaluation of {results}",
                          context={"results": results, "task": task.name, "profile": config.profile},
                          previous=previous)
    print(metrics_table(metrics, compare(metrics, previous) if previous else None))
    print(f"written: {', '.join(paths.values())}")
    return 0
