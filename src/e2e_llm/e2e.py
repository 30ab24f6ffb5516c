# SPDX-License-Identifier: Apache-2.0
"""``make e2e``: every local stage in order, as a story a person can read.

Each stage runs as its own ``e2e-llm`` command in its environment (train: LLaMA-Factory;
serve: vLLM), with its whole output in ``<storage>/e2e/<run id>/<stage>.log``. The terminal
gets a banner per stage, the machine's dtype choice first, the stage's own progress lines and
a closing summary (metrics of the base model and the adapter side by side, where every
artifact is, how to query the service, how to score all of val).

Noise is switched off at its source where a public knob exists (environment knobs of Ray,
Ray Train, Ray Data, LLaMA-Factory and Hugging Face, see :data:`QUIET_ENV`, and a logging filter
for one known Ray Train warning in :mod:`e2e_llm.logs`); the rest of the known noise (Ray Serve's
and vLLM's INFO records, LLaMA-Factory's example dump) stays in the stage's log file and is
only kept off the terminal (:data:`e2e_llm.logs.TERMINAL_NOISE`, each entry with its reason).
Ray's own errors, any line naming an error and every warning not listed there still reach the
terminal.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.config import PipelineConfig
from e2e_llm.hangup import on_stop_signals, restore
from e2e_llm.node_temp import own_temp_dir

# Each knob silences one kind of known noise at its source; none hides errors.
QUIET_ENV = {
    # Ray Data redraws a ~10-line progress block every few seconds: in a log that is hundreds of
    # lines for one batch run. The batch stage prints its own row counts and timing.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # LLaMA-Factory at INFO (its default) also switches transformers to INFO, which dumps the
    # full model and generation configs and tokenizer details from every Ray Train worker.
    "LLAMAFACTORY_VERBOSITY": "WARN",
    # Per-worker tokenisation and dataset-map progress bars of HF datasets (one per worker).
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # tqdm bars (HF Trainer, weight loading) redraw with carriage returns: one logical line
    # becomes dozens in a file. Training prints its own `[train] step` lines instead.
    "TQDM_DISABLE": "1",
    # Ray Train v2 patches print() in workers to also go through its logger: every
    # `[train] step` line reached the terminal twice.
    # (e2e_llm.train sets this for its workers too; here it also covers a Ray started elsewhere.)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
STAGES = ("data", "model", "train", "batch", "serve")
# Val rows `make e2e` scores (adapter and base model, the first N): with 576 training rows this
# keeps the whole run within 15 minutes on 2 AVX2 cores; the summary prints the all-of-val command.
DEFAULT_ROWS = 100


@dataclass
class StageResult:
    name: str
    seconds: float
    returncode: int
    log: str
    hidden: int = 0  # known-noise lines only in the log (e2e_llm.logs.TERMINAL_NOISE)
    peak_bytes: int | None = None  # the stage's process tree, anonymous memory, sampled each second


@dataclass
class E2EResult:
    run_id: str
    run_dir: str  # the stages' logs and the summary, on this machine
    dtype: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    train: dict[str, Any] | None = None
    adapter_batch: dict[str, Any] | None = None
    base_batch: dict[str, Any] | None = None
    base_cached: bool = False
    ok: bool = False
    refused: list[str] = field(default_factory=list)  # why no stage ran (the machine is not ready)
    run_uri: str = ""  # where they are kept: the storage's e2e/<run id> (run_dir, or object storage)

    @property
    def seconds(self) -> float:
        return round(sum(s.seconds for s in self.stages), 1)


def banner(text: str) -> str:
    return f"\n=== {text} " + "=" * max(3, 76 - len(text))


def run_stage(name: str, cmd: list[str], log_path: Path, env: dict[str, str], echo=print) -> StageResult:
    """Run one stage command: every line to ``log_path``, and to the terminal unless it is
    known noise (:class:`e2e_llm.logs.TerminalFilter`)."""
    from e2e_llm.logs import TerminalFilter
    from e2e_llm.memory import OomWatch, PeakSampler

    watch = OomWatch.start()
    terminal = TerminalFilter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        # Unbuffered: the stage's stdout and stderr lines keep their order in one stream.
        # Its own session: a Ctrl-C or SIGTERM reaches the stage once, from _signals_stop_the_stage.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**env, "PYTHONUNBUFFERED": "1"}, text=True,
                                bufsize=1, errors="replace", start_new_session=True)
        assert proc.stdout is not None
        with _signals_stop_the_stage(name, proc, echo):
            # After the handlers: a thread's start waits for it, and a Ctrl-C meanwhile went unforwarded.
            sampler = PeakSampler(proc.pid).start()
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if terminal.show(line):
                    echo(line.rstrip("\n"))
        returncode = proc.wait()
        peak = sampler.stop()
        if returncode < 0:
            # The stage's command itself was killed (its own note, e2e_llm.cli, never came).
            note = _killed_note(name, watch)
            if note:
                log.write(note + "\n")
                echo(note)
    return StageResult(name, round(time.monotonic() - start, 1), returncode, str(log_path), terminal.hidden_total,
                       peak)


def _killed_note(stage: str, watch) -> str | None:
    from e2e_llm.cli import memory_settings

    command = "batch" if stage == "base" else stage  # each stage is the e2e-llm command of its name
    return watch.note(f"the {stage} stage", memory_settings(command))


@contextmanager
def _signals_stop_the_stage(stage: str, proc: subprocess.Popen, echo) -> Iterator[None]:
    """Ctrl-C, SIGTERM or a hangup to e2e goes on to the stage's command (training then aborts and
    says how to resume; a hangup goes on as SIGTERM: the stage has no terminal to lose), and e2e
    keeps reading its output until it stops, instead of leaving mid-line with the stage still
    running. Not to its whole process group: a SIGTERM there also stopped the stage's Ray daemons
    under its graceful abort. A second one kills the group and leaves at once."""
    received = 0

    def forward(signum, frame):
        nonlocal received
        received += 1
        if received > 1:
            _signal_group(proc, signal.SIGKILL)
            raise KeyboardInterrupt
        echo(f"--- {stage}: {signal.Signals(signum).name}; waiting for the stage to stop "
             "(Ctrl-C again to kill it and leave now)")
        proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = on_stop_signals(forward)
    try:
        yield
    finally:
        restore(previous)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signum)


def _closing_line(stage: StageResult) -> str:
    state = "done" if stage.returncode == 0 else f"FAILED (exit {stage.returncode})"
    hidden = f" ({stage.hidden} lines of known noise there only)" if stage.hidden else ""
    return f"--- {stage.name}: {state} in {stage.seconds:.0f} s; log {stage.log}{hidden}"


def find_base_run(config: PipelineConfig, adapter_manifest: dict[str, Any]) -> tuple[str, dict] | None:
    """An earlier base-model batch run that would give the same figures as running it again:
    no adapter, the same base model folder, the same data file (sha256) and number of rows, the
    same engine settings (dtype included), sampling and library versions. Greedy decoding of
    the same weights on the same rows, so its metrics stand for this run's base model."""
    root = config.storage_uri("batch")
    kw = config.storage_kw()
    keys = ("base_model", "engine", "sampling", "versions")
    best = None
    for run_id in storage.list_dir(root, **kw):
        uri = storage.join(root, run_id, "manifest.json")
        if not storage.exists(uri, **kw):
            continue
        try:
            manifest = json.loads(storage.read_text(uri, **kw))
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if manifest.get("adapter") is not None or not manifest.get("metrics"):
            continue
        if any(manifest.get(k) != _comparable(adapter_manifest, k) for k in keys):
            continue
        if (manifest.get("data", {}).get("sha256") != adapter_manifest["data"]["sha256"]
                or manifest.get("rows", {}).get("in") != adapter_manifest["rows"]["in"]):
            continue
        if best is None or manifest.get("finished_at", "") > best[1].get("finished_at", ""):
            best = (run_id, manifest)
    return best


def _comparable(adapter_manifest: dict[str, Any], key: str) -> Any:
    """What a base run's manifest holds under ``key`` for the adapter run's settings."""
    value = adapter_manifest.get(key)
    if key == "engine" and isinstance(value, dict):
        # Merged mode runs a plain engine, as the base run does; LoRA mode adds LoRA keys.
        return {k: v for k, v in value.items() if k not in ("enable_lora", "max_lora_rank", "max_loras")}
    return value


def _read_manifest(config: PipelineConfig, *parts: str) -> dict[str, Any] | None:
    uri = config.storage_uri(*parts)
    if not storage.exists(uri, **config.storage_kw()):
        return None
    return json.loads(storage.read_text(uri, **config.storage_kw()))


def run_e2e(config: PipelineConfig, *, train_cli: str, serve_cli: str, rows: int | None, profile: str,
            python: str | None = None, client: str | None = None, run_id: str | None = None,
            echo=print) -> E2EResult:
    """Run the stages in order (stopping at the first failure) and return what they produced."""
    from e2e_llm.batch.pipeline import local_engines_problem
    from e2e_llm.cli import INTERRUPTED
    from e2e_llm.memory import headroom
    from e2e_llm.precision import model_dtype
    from e2e_llm.ray_address import unreachable_ray_address
    from e2e_llm.runs import new_run_id
    from e2e_llm.serve import start_refusals
    from e2e_llm.serve_turns import holder, serve_turn

    run_id = run_id or new_run_id()
    run_uri = config.storage_uri("e2e", run_id)
    # The stages write their logs here as they go; with object storage write_summary uploads them.
    run_dir = Path(own_temp_dir()) / "e2e" / run_id if storage.is_remote(run_uri) else Path(run_uri)
    choice = model_dtype(config)
    result = E2EResult(run_id=run_id, run_dir=str(run_dir), dtype=choice.as_dict(), run_uri=run_uri)
    env = {**os.environ, **QUIET_ENV}
    echo(banner(f"e2e {run_id}: profile {profile}"))
    # What would stop a stage minutes in (the serve stage's ports after training) is asked now.
    ray_problem = unreachable_ray_address()
    host, port = config.serve.host, config.serve.port
    serving = holder(host, port)  # another pipeline's serve stage: this one's waits its turn
    batch_problem = local_engines_problem(config)
    serve_problems = [message for _, message in start_refusals(config, host, port, ports=serving is None)]
    both = batch_problem in serve_problems  # /dev/shm: both stages start engines here
    result.refused = [*([ray_problem] if ray_problem else []),
                      *([f"the batch{' and serve stages' if both else ' stage'} could not start: {batch_problem}"]
                        if batch_problem else []),
                      *(f"the serve stage could not start: {message}"
                        for message in serve_problems if message != batch_problem)]
    if result.refused:
        for reason in result.refused:
            echo(f"error: {reason}")
        return result
    if serving:
        echo(f"{serving} is in its serve stage on {host}:{port}; this run's serve stage will wait its turn")
    echo(f"dtype: {choice.dtype} ({choice.reason}); model.dtype: {config.model.dtype} in the profile")
    if room := headroom():
        echo(f"memory: {room.describe()}")
    echo(f"full logs: {run_dir}/<stage>.log")

    limit = ["--limit", str(rows)] if rows else []
    subset = f"first {rows} val rows" if rows else "all val rows"
    batch_id = f"e2e-{run_id}-val{rows or 'all'}"
    client_cmd = shlex.join([python or sys.executable, client or "examples/openai_client.py"])  # paths may hold spaces
    plan = [
        ("data", "fetch and validate the dataset", [serve_cli, "data", "--profile", profile]),
        ("model", "prepare the base model", [train_cli, "model", "--profile", profile]),
        ("train", "LoRA SFT on Ray Train", [train_cli, "train", "--profile", profile, "--run-id", run_id,
                                           "--ray-temp-dir", f"/tmp/ray-e2e-{os.getuid()}-train-{os.getpid()}"]),
        ("batch", f"ray.data.llm over the {subset}, adapter merged",
         [serve_cli, "batch", "--profile", profile, "--adapter", run_id, "--split", "val", *limit,
          "--run-id", batch_id]),
        ("serve", "Ray Serve LLM app + one OpenAI-client request",
         [serve_cli, "serve", "--profile", profile, "--publish", run_id,
          "--ray-temp-dir", f"/tmp/ray-e2e-{os.getuid()}-serve-{os.getpid()}", "--then", client_cmd]),
    ]
    total = len(plan) + 1  # the base-model stage runs right after batch
    for i, (name, what, cmd) in enumerate(plan):
        n = i + 1 + (i > STAGES.index("batch"))
        echo(banner(f"{n}/{total} {name}: {what}"))
        with ExitStack() as turn:
            if name == "serve":
                try:
                    turn.enter_context(serve_turn(host, port, run_id, echo))
                except KeyboardInterrupt:
                    echo("--- serve: Ctrl-C while it waited for its turn; not run")
                    result.stages.append(StageResult(name, 0.0, INTERRUPTED, str(run_dir / f"{name}.log")))
                    return result
            stage = run_stage(name, cmd, run_dir / f"{name}.log", env, echo)
        result.stages.append(stage)
        echo(_closing_line(stage))
        if stage.returncode != 0:
            return result
        if name == "train":
            result.train = _read_manifest(config, "runs", run_id, "manifest.json")
        if name == "batch":
            result.adapter_batch = _read_manifest(config, "batch", batch_id, "manifest.json")
            cached = find_base_run(config, result.adapter_batch) if result.adapter_batch else None
            n_base = n + 1
            if cached:
                result.base_batch, result.base_cached = cached[1], True
                echo(banner(f"{n_base}/{total} base model: same rows, engine and sampling scored before"))
                echo(f"reusing base-model batch run {cached[0]} (same model, data sha256, rows, engine, "
                     f"sampling, versions)")
            else:
                base_id = f"e2e-{run_id}-val{rows or 'all'}-base"
                echo(banner(f"{n_base}/{total} base model on the same rows (once per model, rows and engine)"))
                base = run_stage("base", [serve_cli, "batch", "--profile", profile, "--adapter", "none",
                                          "--split", "val", *limit, "--run-id", base_id],
                                 run_dir / "base.log", env, echo)
                result.stages.append(base)
                echo(_closing_line(base))
                if base.returncode != 0:
                    return result
                result.base_batch = _read_manifest(config, "batch", base_id, "manifest.json")
    result.ok = True
    return result


def summary(result: E2EResult, config: PipelineConfig, rows: int | None, profile: str) -> str:
    """The closing table: stage times, base vs adapter metrics, artifacts, next commands."""
    if result.refused:
        return "\n".join([banner(f"summary: e2e {result.run_id} refused before its first stage"), *result.refused])
    lines = [banner(f"summary: e2e {result.run_id} {'finished' if result.ok else 'FAILED'} "
                    f"in {result.seconds / 60:.1f} min"),
             f"dtype {result.dtype['dtype']} ({result.dtype['reason']})", "",
             "| stage | seconds | peak memory |", "| --- | ---: | ---: |"]
    lines += [f"| {s.name} | {s.seconds:.0f} | {_gib(s.peak_bytes)} |" for s in result.stages]
    peak = max((s.peak_bytes or 0 for s in result.stages), default=0)  # stages run one after another
    lines.append(f"| total | {result.seconds:.0f} | {_gib(peak)} |")
    adapter = (result.adapter_batch or {}).get("metrics")
    base = (result.base_batch or {}).get("metrics")
    if adapter:
        n = adapter.get("n")
        lines += ["", f"val metrics, first {n} rows (structured decoding, greedy):", "",
                  "| metric | base model | adapter |", "| --- | ---: | ---: |"]
        for key in ("exact_match", "slot_f1", "function_accuracy", "valid_mr_rate"):
            b = f"{base[key]:.3f}" if base and key in base else "-"
            lines.append(f"| {key} | {b} | {adapter.get(key, float('nan')):.3f} |")
        if result.base_cached:
            lines.append(f"(base model: reused run {result.base_batch.get('run_id')}, same rows/engine/sampling)")
    train = result.train or {}
    m = train.get("metrics", {})
    if train:
        loss, which = m.get("train_loss"), ""
        if loss is None and m.get("train_loss_mean") is not None:  # shorter than one logging window
            loss, which = m["train_loss_mean"], " (mean over the run)"
        lines += ["", f"training: {m.get('global_step')} steps, train loss "
                      f"{f'{loss:.4f}' if isinstance(loss, float) else loss}{which}, "
                      f"{m.get('wall_time_s')} s, {m.get('tokens_per_second') or 0:.0f} tok/s"]
    lines += ["", "artifacts:"]
    if train:
        lines += [f"  adapter      {train.get('adapter_uri')}",
                  f"  run manifest {config.storage_uri('runs', result.run_id, 'manifest.json')}",
                  f"  loss curve   {train.get('loss_curve')}"]
    if result.adapter_batch:
        lines.append(f"  predictions  {result.adapter_batch['outputs']['predictions']}")
    lines.append(f"  logs         {result.run_dir}/<stage>.log"
                 + (f" (kept in {result.run_uri})" if storage.is_remote(result.run_uri or result.run_dir) else ""))
    if not train:  # no adapter to serve or score: the failed stage's log is the next thing to read
        return "\n".join(lines)
    make_profile = "" if profile == "local" else f" PROFILE={profile}"
    lines += ["", "next:",
              f"  serve it:      make serve{make_profile} ADAPTER={result.run_id}   (OpenAI API on "
              f"http://{config.serve.host}:{config.serve.port}/v1; Ctrl-C stops)",
              f"  query it:      {'' if profile == 'local' else f'E2E_LLM_PROFILE={profile} '}"
              ".venv/serve/bin/python examples/openai_client.py [SENTENCE]   "
              f"(model {config.model.id}:{config.data.dataset})",
              f"  all val rows:  make batch-local{make_profile} ADAPTER={result.run_id}   "
              f"(e2e-llm batch --profile {profile} --adapter {result.run_id} --split val)"]
    if rows is None:
        lines.pop()
    return "\n".join(lines)


def _gib(n: int | None) -> str:
    from e2e_llm.memory import GIB

    return f"{n / GIB:.1f} GiB" if n else "-"


def write_summary(result: E2EResult, text: str, fs_kw: dict[str, Any] | None = None) -> None:
    """The summary beside the stages' logs, all uploaded to ``result.run_uri`` when that is in
    object storage (``fs_kw``: the profile's ``storage_kw()``)."""
    run_dir = Path(result.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.md").write_text(text.lstrip("\n") + "\n")
    data = {"run_id": result.run_id, "ok": result.ok, "seconds": result.seconds, "dtype": result.dtype,
            "stages": {s.name: s.seconds for s in result.stages},
            "peak_memory_bytes": {s.name: s.peak_bytes for s in result.stages},
            "metrics": (result.adapter_batch or {}).get("metrics"),
            "base_metrics": (result.base_batch or {}).get("metrics"), "base_cached": result.base_cached,
            "refused": result.refused}
    (run_dir / "summary.json").write_text(json.dumps(data, indent=2) + "\n")
    if result.run_uri and storage.is_remote(result.run_uri):
        storage.upload_dir(run_dir, result.run_uri, **(fs_kw or {}))
