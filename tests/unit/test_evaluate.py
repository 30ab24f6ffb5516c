# SPDX-License-Identifier: Apache-2.0
"""Evaluation: strict exact match, order-insensitive slot scores, error rows, reports."""

from __future__ import annotations

import json

import pytest

from e2e_llm.evaluate import (
    EvaluationError,
    compare,
    evaluate,
    evaluate_rows,
    load_previous,
    metrics_table,
    read_results,
    render_report,
    write_reports,
)
from e2e_llm.task import TaskSchema

TOY = TaskSchema.model_validate(
    {
        "name": "toy-weather",
        "functions": {"forecast": {}, "ask": {"empty_values": True}},
        "attributes": {"city": {}, "day": {"values": ["today", "tomorrow"]}, "hazards": {"list": True}},
    }
)

REF = "inform(name[Diablo II], genres[action-adventure, role-playing], rating[good])"


def test_exact_match_is_strict_string_equality_after_strip(viggo_task):
    m = evaluate(viggo_task, [f"  {REF}\n"], [REF])
    assert m["exact_match"] == 1.0
    reordered = "inform(rating[good], name[Diablo II], genres[role-playing, action-adventure])"
    m = evaluate(viggo_task, [reordered], [REF])
    # Same slots in another order: not an exact match, but perfect slot scores.
    assert m["exact_match"] == 0.0
    assert m["slot_f1"] == 1.0 and m["function_accuracy"] == 1.0 and m["valid_mr_rate"] == 1.0


def test_list_slot_is_one_slot_whose_whole_set_must_match(viggo_task):
    pred = "inform(name[Diablo II], genres[action-adventure], rating[good])"
    m = evaluate(viggo_task, [pred], [REF])
    # name and rating match; genres with one of two values is one wrong slot.
    assert m["slot_precision"] == pytest.approx(2 / 3)
    assert m["slot_recall"] == pytest.approx(2 / 3)
    assert m["worst"][0]["slot_f1"] == pytest.approx(2 / 3)


def test_micro_averaged_precision_and_recall(viggo_task):
    refs = ["inform(name[A], rating[good])", "request(name[B])"]
    preds = ["inform(name[A], rating[poor], esrb[M (for Mature)])", "request(name[B])"]
    m = evaluate(viggo_task, preds, refs)
    # tp = 1 + 1, predicted slots = 3 + 1, reference slots = 2 + 1
    assert m["slot_precision"] == pytest.approx(2 / 4)
    assert m["slot_recall"] == pytest.approx(2 / 3)
    assert m["slot_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["exact_match"] == 0.5


def test_wrong_function_keeps_slot_credit(viggo_task):
    m = evaluate(viggo_task, ["request(name[A])"], ["inform(name[A])"])
    assert m["function_accuracy"] == 0.0 and m["slot_f1"] == 1.0


def test_schema_invalid_prediction_is_not_valid_but_parses_for_partial_credit(viggo_task):
    m = evaluate(viggo_task, ["inform(name[A], rating[superb])"], ["inform(name[A], rating[good])"])
    assert m["valid_mr_rate"] == 0.0
    assert m["function_accuracy"] == 1.0
    assert m["slot_recall"] == 0.5


def test_unparseable_and_error_rows_count_as_wrong_and_are_kept(viggo_task):
    refs = ["inform(name[A])", "inform(name[B])", "inform(name[C])"]
    m = evaluate(viggo_task, ["inform(name[A])", "garbage text", None], refs, inputs=["a", "b", "c"])
    assert m["n"] == 3 and m["n_errors"] == 1
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["valid_mr_rate"] == pytest.approx(1 / 3)
    assert m["slot_recall"] == pytest.approx(1 / 3)
    assert [w["row"] for w in m["worst"]] == [1, 2]
    assert m["worst"][1]["prediction"] is None and m["worst"][1]["input"] == "c"


def test_per_function_breakdown_groups_by_reference_function(viggo_task):
    refs = ["inform(name[A])", "inform(name[B])", "request(name[C])"]
    preds = ["inform(name[A])", "inform(name[X])", "request(name[C])"]
    m = evaluate(viggo_task, preds, refs)
    assert set(m["per_function"]) == {"inform", "request"}
    assert m["per_function"]["inform"]["n"] == 2
    assert m["per_function"]["inform"]["exact_match"] == 0.5
    assert m["per_function"]["request"]["slot_f1"] == 1.0


def test_worst_errors_are_lowest_slot_f1_first_and_exclude_exact_matches(viggo_task):
    refs = ["inform(name[A], rating[good])"] * 3
    preds = ["inform(name[A], rating[good])", "inform(name[A], rating[poor])", "inform(name[Z], rating[poor])"]
    m = evaluate(viggo_task, preds, refs, worst_k=5)
    assert [w["row"] for w in m["worst"]] == [2, 1]
    assert m["worst"][0]["slot_f1"] == 0.0 and m["worst"][1]["slot_f1"] == 0.5


def test_request_attribute_empty_value_slot(viggo_task):
    m = evaluate(viggo_task, ["request_attribute(esrb[])"], ["request_attribute(esrb[])"])
    assert m["exact_match"] == 1.0 and m["valid_mr_rate"] == 1.0 and m["slot_f1"] == 1.0


def test_toy_task_through_evaluation_and_reports(tmp_path):
    refs = ["forecast(city[Oslo], day[today], hazards[snow, wind])", "ask(city[])", "forecast(city[Rome])"]
    preds = ["forecast(day[today], city[Oslo], hazards[wind, snow])", "ask(city[])", "forecast(city[Roma])"]
    m = evaluate(TOY, preds, refs, inputs=["Snow and wind in Oslo today?", "Which city?", "Rome?"])
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["valid_mr_rate"] == 1.0
    assert m["slot_recall"] == pytest.approx(4 / 5)
    assert set(m["per_function"]) == {"forecast", "ask"}
    paths = write_reports(m, tmp_path / "out", title="toy")
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["slot_recall"] == pytest.approx(4 / 5)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| forecast | 2 |" in report and "forecast(city[Roma])" in report
    png = (tmp_path / "out" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert set(paths) == {"metrics.json", "report.md", "metrics.png"}


def test_schema_rejects_what_the_toy_does_not_allow():
    m = evaluate(TOY, ["forecast(day[yesterday])"], ["forecast(day[today])"])
    assert m["valid_mr_rate"] == 0.0 and m["function_accuracy"] == 1.0


def test_comparison_with_previous_metrics_and_manifest(viggo_task, tmp_path):
    now = evaluate(viggo_task, ["inform(name[A])", "inform(name[B])"], ["inform(name[A])", "inform(name[C])"])
    before = evaluate(viggo_task, ["inform(name[X])", "inform(name[B])"], ["inform(name[A])", "inform(name[C])"])
    (tmp_path / "metrics.json").write_text(json.dumps(before))
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "r1", "metrics": before}))
    for source in ("metrics.json", "manifest.json"):
        previous = load_previous(tmp_path / source)
        diff = compare(now, previous)
        assert diff["exact_match"] == {"current": 0.5, "previous": 0.0, "delta": 0.5}
    report = render_report(now, comparison=compare(now, before))
    assert "| exact_match | 0.500 | 0.000 | +0.500 |" in report
    for comparison in (None, compare(now, before)):  # every row of the table has the header's columns
        table = metrics_table({**now, "n_unscored": 1}, comparison).splitlines()
        assert {line.count("|") for line in table} == {table[0].count("|")}
        assert table[-3:][0].startswith("| rows | 2 |") and table[-1].startswith("| unreadable rows, not scored | 1 |")
    write_reports(now, tmp_path / "cmp", previous=before)
    assert json.loads((tmp_path / "cmp" / "metrics.json").read_text())["comparison"]["slot_f1"]["delta"] == 0.5


def test_previous_without_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "r1"}))
    with pytest.raises(EvaluationError, match="holds no metrics"):
        load_previous(tmp_path / "manifest.json")
    with pytest.raises(EvaluationError, match="not found"):
        load_previous(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "preds, refs, message",
    [
        (["inform(name[A])"], [], "1 predictions but 0 references"),
        (["inform(name[A])"], ["not an mr"], "row 0: reference is not a meaning representation"),
        ([3], ["inform(name[A])"], "row 0: prediction must be a string or None"),
    ],
)
def test_bad_inputs_are_clear_errors(viggo_task, preds, refs, message):
    with pytest.raises(EvaluationError, match=message):
        evaluate(viggo_task, preds, refs)


def test_results_rows_use_generated_text_output_and_error_columns(viggo_task, tmp_path):
    rows = [
        {"input": "a", "output": "inform(name[A])", "generated_text": "inform(name[A])", "error": None},
        {"input": "b", "output": "inform(name[B])", "generated_text": "inform(name[B])", "error": "prompt too long"},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = evaluate_rows(viggo_task, read_results(path))
    # The second row's text is ignored: it carries an engine error.
    assert m["n"] == 2 and m["n_errors"] == 1 and m["exact_match"] == 0.5


def test_results_parquet_folder_is_read_whole(viggo_task, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "out"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist([{"output": "inform(name[A])", "prediction": "inform(name[A])"}]),
                       folder / f"part-{i}.parquet")
    assert evaluate_rows(viggo_task, read_results(folder))["n"] == 2


def test_results_file_problems_name_the_file_and_line(viggo_task, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"output": "inform(name[A])", "prediction": "x"}\n{oops\n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl:2: invalid JSON"):
        read_results(bad)
    nopred = tmp_path / "nopred.jsonl"
    nopred.write_text('{"output": "inform(name[A])"}\n')
    with pytest.raises(EvaluationError, match="no prediction column"):
        evaluate_rows(viggo_task, read_results(nopred), source=str(nopred))
    with pytest.raises(EvaluationError, match="no rows"):
        evaluate_rows(viggo_task, [], source="empty.jsonl")
    with pytest.raises(EvaluationError, match="not found"):
        read_results(tmp_path / "missing.jsonl")
    csv = tmp_path / "rows.csv"
    csv.write_text("output,prediction\n")
    with pytest.raises(EvaluationError, match=r"rows.csv: not a results file: use .jsonl, .json, .parquet"):
        read_results(csv)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"output": "a"}\n{"output": "caf\xe9"}\n')
    with pytest.raises(EvaluationError, match=r"latin.jsonl:2: not UTF-8"):
        read_results(latin)
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(EvaluationError, match=r"fake.parquet: not a readable Parquet file"):
        read_results(fake)


def test_a_json_file_may_hold_one_array_of_rows(viggo_task, tmp_path):
    rows = [{"output": "inform(name[A])", "prediction": "inform(name[A])"}] * 2
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, indent=2))
    assert read_results(path) == rows
    path.write_text(json.dumps([rows[0], 3]))
    with pytest.raises(EvaluationError, match="row 2 of the array must be a JSON object"):
        read_results(path)


def test_evaluate_cli_on_a_results_file(tmp_path, capsys, project_root, monkeypatch):
    from e2e_llm.cli import main

    monkeypatch.chdir(project_root)
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"input": "x", "output": "inform(name[A])", "generated_text": "inform(name[A])"}) + "\n")
    assert main(["evaluate", "--profile", "local", "--results", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| exact_match | 1.000 |" in out
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "metrics.png").is_file()
    assert main(["evaluate", "--profile", "local", "--results", str(tmp_path / "none.jsonl")]) == 1
    assert "results file not found" in capsys.readouterr().err


def test_evaluating_a_batch_runs_predictions_keeps_the_runs_files_and_checks_its_task(tmp_path, capsys, project_root,
                                                                                     monkeypatch):
    """Evaluate wrote over the run's own metrics.json and report, and with the default profile scored
    another task's predictions against VIGGO's schema (valid_mr_rate 0.000, without a word)."""
    from e2e_llm.cli import main

    monkeypatch.chdir(project_root)
    run = tmp_path / "batch" / "r1"
    run.mkdir(parents=True)
    row = {"input": "x", "output": "inform(name[A])", "generated_text": "inform(name[A])"}
    (run / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    (run / "metrics.json").write_text('{"the run": "its own"}')
    manifest = {"kind": "batch", "profile": "home", "task": {"name": "home", "schema": "tasks/home.yaml"}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["evaluate", "--profile", "local", "--results", str(run / "predictions.jsonl")]) == 1
    assert ("predictions of a batch run for task 'home' (profile 'home'); this profile's task is 'viggo': pass "
            "that run's --profile") in capsys.readouterr().err

    (run / "manifest.json").write_text(json.dumps({**manifest, "task": {"name": "viggo"}}))
    assert main(["evaluate", "--profile", "local", "--results", str(run / "predictions.jsonl")]) == 0
    assert f"written: {run}/evaluate/metrics.json" in capsys.readouterr().out
    assert (run / "metrics.json").read_text() == '{"the run": "its own"}'
    assert json.loads((run / "evaluate" / "metrics.json").read_text())["exact_match"] == 1.0


def test_a_line_that_could_not_be_read_is_left_out_and_counted(viggo_task):
    """A batch's error row for a line that is not JSON has no reference: the rest are scored."""
    from e2e_llm.evaluate import Unlabelled

    good = [{"_line": 1, "input": "a", "output": REF, "generated_text": REF, "error": None},
            {"_line": 3, "input": "b", "output": REF, "generated_text": "nonsense", "error": None}]
    unreadable = {"_line": 2, "raw": "{bad", "generated_text": None, "error": "rows.jsonl:2: invalid JSON"}
    no_input = {"_line": 4, "output": REF, "generated_text": None, "error": "rows.jsonl:4: no input"}
    m = evaluate_rows(viggo_task, [good[0], unreadable, good[1], no_input])
    assert (m["n"], m["n_errors"], m["n_unscored"], m["exact_match"]) == (3, 1, 1, 1 / 3)
    with pytest.raises(Unlabelled, match="row 2: field 'output' missing"):  # read, but no reference
        evaluate_rows(viggo_task, [good[0], {"input": "c", "generated_text": REF, "error": None}])
    with pytest.raises(Unlabelled, match="no row has a reference"):
        evaluate_rows(viggo_task, [good[0] | {"output": None, "error": "x"}, unreadable])
    with pytest.raises(EvaluationError) as caught:  # a reference that is not text is bad data, not unlabelled
        evaluate_rows(viggo_task, [good[0], good[1] | {"output": 5}])
    assert not isinstance(caught.value, Unlabelled)
