# SPDX-License-Identifier: Apache-2.0
"""Evaluation of generated meaning representations against references, plus the reports.

``evaluate(task, predictions, references, inputs)`` returns a plain dict:

- ``exact_match``: the tutorial's strict metric, ``prediction.strip() == reference.strip()``.
- ``function_accuracy``: the predicted function name equals the reference's (the prediction
  only needs to parse syntactically, so a wrong attribute does not hide a right function).
- ``slot_precision`` / ``slot_recall`` / ``slot_f1``: micro-averaged over all rows, order
  insensitive, through the task's MR parser. A slot is ``(attribute, set of values)``: a list
  slot such as ``genres[a, b]`` is one slot whose whole value set must match.
- ``valid_mr_rate``: share of predictions the task schema accepts (function, attribute names,
  closed vocabularies).
- ``per_function``: the same figures per reference function; ``worst``: the rows with the
  lowest slot F1, with input, prediction and reference.

A prediction of ``None`` is a row the engine failed on (an error row): it counts as wrong
everywhere and in ``n_errors``. Only an error row without a reference (a line the batch could not
read as JSON) cannot be scored: it is counted in ``n_unscored`` and stays in the predictions.
Report writers produce ``metrics.json``, ``report.md`` and a PNG chart, optionally compared with a
previous run's metrics or manifest.
Pure Python apart from the chart (matplotlib, imported when drawn).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from e2e_llm.task import MeaningRepresentation, MRError, TaskSchema, parse_mr

HEADLINE = ("exact_match", "function_accuracy", "slot_precision", "slot_recall", "slot_f1", "valid_mr_rate")
# Column names a results file may use, most specific first (ray.data.llm writes generated_text).
PREDICTION_COLUMNS = ("prediction", "generated_text")
REFERENCE_COLUMNS = ("reference", "output")
INPUT_COLUMNS = ("input",)
ERROR_COLUMNS = ("error",)
RESULT_SUFFIXES = (".jsonl", ".json", ".parquet")
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CHART_FILE = "metrics.png"


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (length mismatch, invalid reference, unreadable file)."""


class Unlabelled(EvaluationError):
    """Rows without references to score against (a row that was read has none)."""


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(tp: int, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    return _ratio(2 * tp, n_pred + n_ref)


def _lenient_parse(task: TaskSchema, text: str | None) -> MeaningRepresentation | None:
    """Syntax-only parse (unknown names and values allowed), for partial credit."""
    if text is None:
        return None
    try:
        return parse_mr(text, list_attributes={n for n, a in task.attributes.items() if a.list})
    except MRError:
        return None


def _counts() -> dict[str, int]:
    return {"n": 0, "exact": 0, "function": 0, "valid": 0, "errors": 0, "tp": 0, "pred_slots": 0, "ref_slots": 0}


def _figures(c: dict[str, int]) -> dict[str, Any]:
    precision = _ratio(c["tp"], c["pred_slots"])
    recall = _ratio(c["tp"], c["ref_slots"])
    return {
        "n": c["n"],
        "n_errors": c["errors"],
        "exact_match": _ratio(c["exact"], c["n"]),
        "function_accuracy": _ratio(c["function"], c["n"]),
        "slot_precision": precision,
        "slot_recall": recall,
        "slot_f1": _ratio(2 * precision * recall, precision + recall),
        "valid_mr_rate": _ratio(c["valid"], c["n"]),
    }


def evaluate(
    task: TaskSchema,
    predictions: Sequence[str | None],
    references: Sequence[str],
    inputs: Sequence[str] | None = None,
    *,
    worst_k: int = 10,
) -> dict[str, Any]:
    """Score ``predictions`` against ``references`` (same order); see the module docstring."""
    if len(predictions) != len(references):
        raise EvaluationError(f"{len(predictions)} predictions but {len(references)} references")
    if inputs is not None and len(inputs) != len(references):
        raise EvaluationError(f"{len(inputs)} inputs but {len(references)} references")
    total = _counts()
    by_function: dict[str, dict[str, int]] = defaultdict(_counts)
    rows: list[dict[str, Any]] = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if not isinstance(ref, str):
            raise EvaluationError(f"row {i}: reference must be a string, got {type(ref).__name__}")
        if pred is not None and not isinstance(pred, str):
            raise EvaluationError(f"row {i}: prediction must be a string or None, got {type(pred).__name__}")
        ref_mr = _lenient_parse(task, ref)
        if ref_mr is None:
            raise EvaluationError(f"row {i}: reference is not a meaning representation: {ref!r}")
        pred_mr = _lenient_parse(task, pred)
        ref_slots = ref_mr.slot_keys()
        pred_slots = pred_mr.slot_keys() if pred_mr else set()
        tp = len(pred_slots & ref_slots)
        row = {
            "exact": int(pred is not None and pred.strip() == ref.strip()),
            "function": int(pred_mr is not None and pred_mr.function == ref_mr.function),
            "valid": int(pred is not None and task.try_parse(pred) is not None),
            "errors": int(pred is None),
            "tp": tp,
            "pred_slots": len(pred_slots),
            "ref_slots": len(ref_slots),
            "n": 1,
        }
        for bucket in (total, by_function[ref_mr.function]):
            for key, value in row.items():
                bucket[key] += value
        rows.append(
            {
                "row": i,
                "slot_f1": _f1(tp, len(pred_slots), len(ref_slots)),
                "exact": bool(row["exact"]),
                "input": inputs[i] if inputs is not None else None,
                "prediction": pred,
                "reference": ref,
            }
        )
    metrics = _figures(total)
    metrics["per_function"] = {fn: _figures(c) for fn, c in sorted(by_function.items())}
    wrong = [r for r in rows if not r["exact"]]
    wrong.sort(key=lambda r: (r["slot_f1"], r["row"]))
    metrics["worst"] = [{k: v for k, v in r.items() if k != "exact"} for r in wrong[:worst_k]]
    return metrics


# ---------------------------------------------------------------------------------------
# Results files


def _pick(columns: Iterable[str], candidates: Sequence[str], what: str, source: str, required: bool = True):
    columns = list(columns)
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise EvaluationError(
            f"{source}: no {what} column (looked for {', '.join(candidates)}; found {', '.join(columns) or 'none'})"
        )
    return None


def read_results(uri: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file or folder: JSONL (``.jsonl``; ``.json`` may also hold one JSON array
    of rows) or Parquet, local or remote; a folder of ``.jsonl``/``.parquet`` parts."""
    from e2e_llm import storage

    uri = str(uri)
    if not uri.endswith(RESULT_SUFFIXES):
        if not storage.is_remote(uri) and Path(uri).is_file():
            raise EvaluationError(f"{uri}: not a results file: use {', '.join(RESULT_SUFFIXES)} or a folder of "
                                  ".jsonl/.parquet parts")
        try:
            names = storage.list_dir(uri)
        except (FileNotFoundError, NotADirectoryError):
            names = []
        parts = [n for n in names if n.endswith((".jsonl", ".parquet")) and not n.startswith(".")]
        if parts:
            return [row for name in parts for row in read_results(storage.join(uri, name))]
        if not storage.is_remote(uri) and Path(uri).is_dir():
            raise EvaluationError(f"{uri}: folder holds no .jsonl or .parquet files")
    if not storage.exists(uri):
        raise EvaluationError(f"{uri}: results file not found")
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise EvaluationError(f"{uri}: not a readable Parquet file ({exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise EvaluationError(f"{uri}:{line}: not UTF-8 text") from None
    if uri.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{uri}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise EvaluationError(f"{uri}: row {number} of the array must be a JSON object")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{uri}:{number}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise EvaluationError(f"{uri}:{number}: row must be a JSON object")
        rows.append(row)
    return rows


def evaluate_rows(task: TaskSchema, rows: list[dict[str, Any]], source: str = "results", **kw: Any) -> dict[str, Any]:
    """Evaluate result rows: prediction from ``prediction``/``generated_text``, reference from
    ``reference``/``output``; rows with a non-empty ``error`` count as failed predictions. A row
    with an error and no string reference (a line the batch could not read) cannot be scored: it is
    left out and counted in ``n_unscored``. Any other row without a reference: :class:`Unlabelled`."""
    if not rows:
        raise EvaluationError(f"{source}: no rows to evaluate")
    columns = set().union(*(r.keys() for r in rows))
    pred_col = _pick(columns, PREDICTION_COLUMNS, "prediction", source)
    input_col = _pick(columns, INPUT_COLUMNS, "input", source, required=False)
    error_col = _pick(columns, ERROR_COLUMNS, "error", source, required=False)
    try:
        ref_col = _pick(columns, REFERENCE_COLUMNS, "reference", source)
    except EvaluationError as exc:
        raise Unlabelled(str(exc)) from None
    predictions, references, inputs = [], [], []
    unscored = 0
    for i, row in enumerate(rows):
        ref = row.get(ref_col)
        failed = error_col is not None and row.get(error_col)
        if not isinstance(ref, str):
            if failed:
                unscored += 1
                continue
            raise (EvaluationError if ref is not None else Unlabelled)(
                f"{source}: row {i + 1}: field {ref_col!r} missing or not a string")
        pred = row.get(pred_col)
        predictions.append(None if failed or not isinstance(pred, str) else pred)
        references.append(ref)
        inputs.append(str(row.get(input_col, "")) if input_col else "")
    if not references:
        raise Unlabelled(f"{source}: no row has a reference ({ref_col!r})")
    return {**evaluate(task, predictions, references, inputs if input_col else None, **kw), "n_unscored": unscored}


# ---------------------------------------------------------------------------------------
# Comparison and reports


def load_previous(uri: str | Path) -> dict[str, Any]:
    """Metrics from a previous ``metrics.json`` or a run manifest holding a ``metrics`` key."""
    from e2e_llm import storage

    uri = str(uri)
    if not storage.exists(uri):
        raise EvaluationError(f"{uri}: previous metrics not found")
    try:
        data = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{uri}: invalid JSON: {exc.msg}") from None
    metrics = data.get("metrics", data) if isinstance(data, dict) else None
    if not isinstance(metrics, dict) or "exact_match" not in metrics:
        raise EvaluationError(f"{uri}: holds no metrics (expected exact_match, slot_f1, ...)")
    return metrics


def compare(current: dict[str, Any], previous: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Headline metric -> {current, previous, delta} for metrics both runs have."""
    out = {}
    for key in HEADLINE:
        if key in current and key in previous:
            out[key] = {"current": current[key], "previous": previous[key], "delta": current[key] - previous[key]}
    return out


def metrics_table(metrics: dict[str, Any], comparison: dict[str, dict[str, float]] | None = None) -> str:
    """The headline figures as a markdown table (printed by the CLI, embedded in the report)."""
    if comparison:
        lines = ["| metric | value | previous | delta |", "| --- | ---: | ---: | ---: |"]
        for key in HEADLINE:
            c = comparison.get(key)
            prev = f"{c['previous']:.3f}" if c else "-"
            delta = f"{c['delta']:+.3f}" if c else "-"
            lines.append(f"| {key} | {metrics[key]:.3f} | {prev} | {delta} |")
    else:
        lines = ["| metric | value |", "| --- | ---: |"] + [f"| {k} | {metrics[k]:.3f} |" for k in HEADLINE]
    counts = [("rows", metrics["n"]), ("engine errors", metrics["n_errors"])]
    if metrics.get("n_unscored"):
        counts.append(("unreadable rows, not scored", metrics["n_unscored"]))
    empty = " |" * (lines[0].count("|") - 3)  # the columns a count leaves empty
    lines += [f"| {name} | {count} |{empty}" for name, count in counts]
    return "\n".join(lines)


def _cell(text: Any, width: int = 160) -> str:
    text = "" if text is None else str(text)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_report(
    metrics: dict[str, Any],
    *,
    title: str = "Evaluation report",
    context: dict[str, Any] | None = None,
    comparison: dict[str, dict[str, float]] | None = None,
    chart: str | None = CHART_FILE,
) -> str:
    lines = [f"# {title}", ""]
    for key, value in (context or {}).items():
        lines.append(f"- **{key}**: {value}")
    if context:
        lines.append("")
    lines += ["## Metrics", "", metrics_table(metrics, comparison), ""]
    lines += [
        (
            "exact_match is the strict string match (the tutorial's metric); slot scores are micro-averaged, "
            "order-insensitive, with a list attribute counted as one slot whose value set must match."
        ),
        "",
    ]
    if chart:
        lines += [f"![metrics]({chart})", ""]
    lines += ["## Per function", "", "| function | rows | exact | function acc | slot F1 | valid MR |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for fn, m in metrics["per_function"].items():
        lines.append(f"| {fn} | {m['n']} | {m['exact_match']:.3f} | {m['function_accuracy']:.3f} | "
                     f"{m['slot_f1']:.3f} | {m['valid_mr_rate']:.3f} |")
    lines += ["", "## Worst errors", ""]
    if not metrics["worst"]:
        lines.append("No errors: every prediction matches its reference.")
    else:
        lines += ["| row | slot F1 | input | prediction | reference |", "| ---: | ---: | --- | --- | --- |"]
        for w in metrics["worst"]:
            pred = "*(engine error)*" if w["prediction"] is None else f"`{_cell(w['prediction'])}`"
            lines.append(f"| {w['row']} | {w['slot_f1']:.2f} | {_cell(w['input'])} | {pred} | "
                         f"`{_cell(w['reference'])}` |")
    return "\n".join(lines) + "\n"


def draw_chart(metrics: dict[str, Any], path: Path, previous: dict[str, Any] | None = None) -> Path:
    """Headline metrics (beside the previous run's when given) and slot F1 per function."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.3]})
    xs = range(len(HEADLINE))
    width = 0.4 if previous else 0.7
    if previous:
        left.bar([x - width / 2 for x in xs], [previous.get(k, 0.0) for k in HEADLINE], width, label="previous",
                 color="#bbbbbb")
    left.bar([x + (width / 2 if previous else 0) for x in xs], [metrics[k] for k in HEADLINE], width,
             label="current", color="#3b75af")
    left.set_xticks(list(xs), [k.replace("_", "\n") for k in HEADLINE], fontsize=8)
    left.set_ylim(0, 1.05)
    left.set_title(f"Overall ({metrics['n']} rows)")
    if previous:
        left.legend(fontsize=8)
    functions = list(metrics["per_function"])
    labels = [f"{f} ({metrics['per_function'][f]['n']})" for f in functions]
    right.barh(labels, [metrics["per_function"][f]["slot_f1"] for f in functions], color="#519e3e")
    right.set_xlim(0, 1.05)
    right.set_title("Slot F1 per reference function (rows)")
    right.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(
    metrics: dict[str, Any],
    out_dir: str | Path,
    *,
    title: str = "Evaluation report",
    context: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
    storage_kw: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Write metrics.json, report.md and the chart into ``out_dir`` (local path or URI)."""
    import tempfile

    from e2e_llm import storage

    comparison = compare(metrics, previous) if previous else None
    payload = dict(metrics)
    if comparison:
        payload["comparison"] = comparison
    report = render_report(metrics, title=title, context=context, comparison=comparison)
    out = str(out_dir)
    paths = {name: storage.join(out, name) for name in (METRICS_FILE, REPORT_FILE, CHART_FILE)}
    kw = storage_kw or {}
    storage.write_text(paths[METRICS_FILE], json.dumps(payload, indent=2, ensure_ascii=False) + "\n", **kw)
    storage.write_text(paths[REPORT_FILE], report, **kw)
    with tempfile.TemporaryDirectory() as tmp:
        chart = draw_chart(metrics, Path(tmp) / CHART_FILE, previous)
        storage.write_bytes(paths[CHART_FILE], chart.read_bytes(), **kw)
    return paths
