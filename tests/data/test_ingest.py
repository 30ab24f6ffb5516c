# SPDX-License-Identifier: Apache-2.0
"""Ingestion: every malformed row is a reject naming file/line/reason, none lost."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from e2e_llm.data import IngestError, ingest, read_jsonl
from e2e_llm.task import TaskSchema

GOOD = {"instruction": "Extract.", "input": "Diablo II is good.", "output": "inform(name[Diablo II], rating[good])"}


def _line(**overrides) -> str:
    return json.dumps({**GOOD, **overrides})


MALFORMED = {
    "truncated JSON": '{"instruction": "x", "input": "y", "output": "inform(name[X])"',
    "wrong type": _line(input=42),
    "empty output": _line(output="  "),
    "missing field": json.dumps({"instruction": "x", "input": "y"}),
    "unknown function": _line(output="dance(name[X])"),
    "unknown attribute": _line(output="inform(colour[red])"),
    "unbalanced brackets": _line(output="inform(name[X)"),
    "duplicate keys": '{"instruction": "a", "input": "b", "output": "inform(name[X])", "input": "c"}',
    "not an object": "[1, 2, 3]",
    "value outside vocabulary": _line(output="inform(name[X], rating[superb])"),
}
REASONS = {
    "truncated JSON": "invalid JSON",
    "wrong type": "field 'input' must be a string",
    "empty output": "field 'output' is empty",
    "missing field": "field 'output' missing",
    "unknown function": "unknown function 'dance'",
    "unknown attribute": "unknown attribute 'colour'",
    "unbalanced brackets": "never closed",
    "duplicate keys": "duplicate key 'input'",
    "not an object": "must be a JSON object",
    "value outside vocabulary": "not allowed for attribute 'rating'",
}


def _ingest(tmp_path: Path, task: TaskSchema, files: dict[str, bytes], fmt="alpaca", required=("train",),
            system_prompt=None):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name, content in files.items():
        (src / name).write_bytes(content)
    return ingest(
        source=str(src),
        splits={"train": "train.jsonl", "val": "val.jsonl"},
        output_dir=tmp_path / "out",
        task=task,
        dataset="t",
        fmt=fmt,
        required=required,
        system_prompt=system_prompt,
    )


def test_every_malformed_kind_becomes_a_reject_with_reason_and_line(tmp_path, viggo_task):
    lines = [_line()] + list(MALFORMED.values()) + [_line()]
    content = ("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff\xfe", "input": "y", "output": "o"}\n'
    report = _ingest(tmp_path, viggo_task, {"train.jsonl": content})
    rejects = read_jsonl(tmp_path / "out/rejects.jsonl")
    assert report.rows_in == len(lines) + 1 == 2 + len(rejects)
    by_line = {r["line"]: r for r in rejects}
    for offset, kind in enumerate(MALFORMED, start=2):
        assert REASONS[kind] in by_line[offset]["reason"], kind
        assert by_line[offset]["source"] == "train.jsonl"
    assert "not UTF-8" in by_line[len(lines) + 1]["reason"]
    assert len(read_jsonl(tmp_path / "out/train.jsonl")) == 2


def test_bom_and_crlf_are_accepted_and_normalised(tmp_path, viggo_task):
    content = b"\xef\xbb\xbf" + (_line() + "\r\n" + _line(input="line\r\ntwo") + "\r\n").encode()
    report = _ingest(tmp_path, viggo_task, {"train.jsonl": content})
    assert report.rows_rejected == 0
    rows = read_jsonl(tmp_path / "out/train.jsonl")
    assert rows[1]["input"] == "line\ntwo"
    assert b"\r" not in (tmp_path / "out/train.jsonl").read_bytes()


def test_rows_holding_characters_other_line_splitters_break_at_read_back_whole(tmp_path, viggo_task):
    """Clean rows are written with ensure_ascii=False, so U+2028, U+0085 or \\x1c in a text stays
    raw in the file: str.splitlines breaks a row there (the training row check, the training
    manifest and canary-set read with it and failed on such a row)."""
    from e2e_llm.data import parse_jsonl
    from e2e_llm.train_rows import rows_trained

    odd = "one\u2028two\u0085three\x1cfour"
    _ingest(tmp_path, viggo_task, {"train.jsonl": (_line(input=odd) + "\n" + _line() + "\n").encode()})
    text = (tmp_path / "out/train.jsonl").read_text(encoding="utf-8")
    assert "\u2028" in text and len(text.splitlines()) > 2  # raw in the file, where splitlines would cut
    assert [row["input"] for row in read_jsonl(tmp_path / "out/train.jsonl")] == [odd, GOOD["input"]]
    assert [number for number, _ in parse_jsonl(text)] == [1, 2]
    assert [(number, row["input"]) for number, row in rows_trained(text, None)] == [(1, odd), (2, GOOD["input"])]


def test_empty_file_is_a_clear_error(tmp_path, viggo_task):
    with pytest.raises(IngestError, match="train.jsonl: file is empty"):
        _ingest(tmp_path, viggo_task, {"train.jsonl": b""})


def test_missing_required_split_is_a_clear_error(tmp_path, viggo_task):
    with pytest.raises(IngestError, match="val.jsonl: split file not found"):
        _ingest(tmp_path, viggo_task, {"train.jsonl": _line().encode()}, required=("train", "val"))


def test_missing_optional_split_is_skipped(tmp_path, viggo_task):
    report = _ingest(tmp_path, viggo_task, {"train.jsonl": _line().encode()})
    assert [s.split for s in report.splits] == ["train"]


def test_sharegpt_rows_are_converted_to_the_same_chat_layout(tmp_path, viggo_task):
    rows = [
        {"conversations": [{"from": "system", "value": "Extract."}, {"from": "human", "value": "Diablo II is good."},
                           {"from": "gpt", "value": "inform(name[Diablo II], rating[good])"}]},
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "inform(name[X])"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
    ]
    report = _ingest(tmp_path, viggo_task, {"train.jsonl": "\n".join(map(json.dumps, rows)).encode()}, fmt="sharegpt")
    clean = read_jsonl(tmp_path / "out/train.jsonl")
    assert clean[0] == GOOD
    assert clean[1]["instruction"] == viggo_task.default_instruction()  # no system turn: the task's prompt
    assert report.rows_rejected == 1
    assert "more than one user turn" in read_jsonl(tmp_path / "out/rejects.jsonl")[0]["reason"]


def test_dataset_info_maps_instruction_to_the_system_turn(tmp_path, viggo_task):
    _ingest(tmp_path, viggo_task, {"train.jsonl": _line().encode(), "val.jsonl": _line().encode()})
    info = json.loads((tmp_path / "out/dataset_info.json").read_text())
    assert set(info) == {"t-train", "t-val"}
    assert info["t-train"]["columns"] == {"system": "instruction", "prompt": "input", "response": "output"}
    assert info["t-train"]["file_name"] == "train.jsonl"  # relative: portable across machines


def test_rerun_is_idempotent(tmp_path, viggo_task):
    files = {"train.jsonl": (_line() + "\n" + MALFORMED["wrong type"]).encode()}
    _ingest(tmp_path, viggo_task, files)
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.json*")}
    _ingest(tmp_path, viggo_task, files)
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.json*")}
    assert not list((tmp_path / "out").rglob("*.part"))


def test_full_viggo_splits_validate(tmp_path, viggo_task, viggo_dir):
    report = ingest(source=str(viggo_dir), splits={"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
                    output_dir=tmp_path, task=viggo_task, dataset="viggo", required=("train", "val"))
    assert {s.split: s.rows_clean for s in report.splits} == {"train": 5103, "val": 714}
    assert report.rows_rejected == 0


def test_toy_non_viggo_task_ingests(tmp_path):
    toy = TaskSchema.model_validate({"name": "toy", "functions": {"forecast": {}},
                                     "attributes": {"city": {}, "hazards": {"list": True}}})
    rows = [{"instruction": "i", "input": "Rain and wind in Oslo",
             "output": "forecast(city[Oslo], hazards[rain, wind])"},
            {"instruction": "i", "input": "x", "output": "inform(name[X])"}]
    report = _ingest(tmp_path, toy, {"train.jsonl": "\n".join(map(json.dumps, rows)).encode()})
    assert (report.rows_in, report.rows_rejected) == (2, 1)


# -- download over loopback HTTP ----------------------------------------------------------


class _FlakyServer(BaseHTTPRequestHandler):
    payload = b""
    fail_first = 0  # drop the connection half-way this many times
    requests: list[str] = []

    def do_GET(self):
        type(self).requests.append(self.headers.get("Range") or "")
        if self.path.endswith("missing.jsonl"):
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    _FlakyServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_resumes_after_a_dropped_connection(tmp_path, viggo_task, http_server):
    _FlakyServer.payload = ("\n".join([_line()] * 200) + "\n").encode()
    _FlakyServer.fail_first = 1
    report = ingest(source=http_server, splits={"train": "train.jsonl"}, output_dir=tmp_path, task=viggo_task,
                    dataset="t")
    assert report.splits[0].rows_clean == 200
    assert (tmp_path / "raw/train.jsonl").read_bytes() == _FlakyServer.payload
    assert _FlakyServer.requests[0] == "" and _FlakyServer.requests[1].startswith("bytes=")  # resumed, not restarted
    assert not list(tmp_path.rglob("*.part"))


def test_download_404_is_a_clear_error_and_leaves_no_partial_file(tmp_path, viggo_task, http_server):
    with pytest.raises(IngestError, match="missing.jsonl: not found"):
        ingest(source=http_server, splits={"train": "missing.jsonl"}, output_dir=tmp_path, task=viggo_task,
               dataset="t")
    assert not list(tmp_path.rglob("*.part"))


def test_system_prompt_replaces_every_clean_rows_instruction_in_every_split(tmp_path, viggo_task):
    train = (_line(instruction="A long instruction.") + "\n" + _line(output="dance(name[X])") + "\n").encode()
    val_row = _line(instruction="Another one.", input="Val row.")
    report = _ingest(tmp_path, viggo_task, {"train.jsonl": train, "val.jsonl": (val_row + "\n").encode()},
                     system_prompt="Write the MR.")
    train_rows = read_jsonl(tmp_path / "out/train.jsonl")
    val_rows = read_jsonl(tmp_path / "out/val.jsonl")
    assert [r["instruction"] for r in train_rows + val_rows] == ["Write the MR.", "Write the MR."]
    assert val_rows[0]["input"] == "Val row." and train_rows[0]["output"] == GOOD["output"]
    # the reject keeps the line as it came, and nothing is lost
    assert report.rows_in == 3 == len(train_rows) + len(val_rows) + report.rows_rejected
    assert "A long" not in (tmp_path / "out/train.jsonl").read_text()
    saved = json.loads((tmp_path / "out/ingest_report.json").read_text())
    assert saved["system_prompt"] == "Write the MR."


def test_without_system_prompt_each_rows_instruction_is_kept(tmp_path, viggo_task):
    _ingest(tmp_path, viggo_task, {"train.jsonl": (_line(instruction="Keep me.") + "\n").encode()})
    assert read_jsonl(tmp_path / "out/train.jsonl")[0]["instruction"] == "Keep me."
    assert json.loads((tmp_path / "out/ingest_report.json").read_text())["system_prompt"] is None


def test_a_source_folder_that_is_not_there_names_the_profile_field_and_what_it_should_hold(
        write_profile, tmp_path, capsys, monkeypatch):
    """A clone without ../shared beside it: the data stage says which setting to change."""
    from e2e_llm.cli import main

    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path / "store"))
    path = write_profile(lambda d: d["data"].update(source=str(tmp_path / "no-such-folder")))
    assert main(["data", "--profile", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path}/no-such-folder (data.source in {path}) is not a folder" in err
    assert "holding train.jsonl, val.jsonl, test.jsonl" in err
    assert main(["data", "--profile", str(path), "--source", str(tmp_path / "elsewhere")]) == 1
    assert f"{tmp_path}/elsewhere (--source) is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("broken", [False, True])
def test_object_storage_leaves_no_local_copy_behind(write_profile, tmp_path, monkeypatch, s3_server, broken):
    """With object storage the data stage builds the dataset in a temporary folder and uploads it:
    each run left that folder (the whole dataset, raw files included) in /tmp, a failed one too."""
    import tempfile
    import uuid

    import boto3
    from conftest import ROOT

    from e2e_llm import storage
    from e2e_llm.cli import main

    bucket = f"dt-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", f"s3://{bucket}/store")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    source = tmp_path / "source"
    source.mkdir()
    shared = ROOT.parent / "shared" / "data" / "viggo"
    for name in ("train.jsonl", "val.jsonl"):
        lines = (shared / name).read_text().splitlines()[:20]
        (source / name).write_text("\n".join(lines) + "\n")
    if broken:  # a split the profile requires is missing: the stage fails after making its folder
        (source / "val.jsonl").unlink()
    path = write_profile(lambda d: d["data"].update(source=str(source), task=str(ROOT / d["data"]["task"])))
    assert main(["data", "--profile", str(path)]) == (1 if broken else 0)
    uploaded = storage.exists(f"s3://{bucket}/store/data/viggo/dataset_info.json")
    assert uploaded is not broken
    assert list(temp.iterdir()) == []
