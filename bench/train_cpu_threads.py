#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""CPU training on a machine with more cores than ours, or fewer than it shows: `e2e-llm train`
of the local profile with each worker's compute threads at 1 (what the local profile gave every
machine before session 34: ``resources_per_worker: {CPU: 1}``) against ``auto``
(``train.cpu_threads_per_worker``: the usable CPUs shared among the workers), and optionally the
same inside a cgroup CPU quota (a container's ``--cpus``), where ``auto`` follows the quota and a
quota-blind count (the affinity's share) is the baseline.

Each setting is one unchanged `e2e-llm train` of the local profile with only the model source,
the storage root and ``train.cpu_threads_per_worker`` changed, ``--set max_steps=N``; step time is
the steady part (TensorBoard wall times of the logged steps after the first). Both sides run in
one call, back to back, on the same machine.

    # here (train env), or on the GPU machine with the GPU hidden after device_ray.py's setup:
    python bench/train_cpu_threads.py run --steps 48 --out /tmp/cpu-threads [--device] \
        [--quota 4 --quota-threads 8]
    # here: table, bench/results.jsonl rows (train_cpu_threads), from the report
    .venv/serve/bin/python bench/train_cpu_threads.py record /tmp/cpu-threads/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device  # noqa: E402

ROOT = _device.ROOT


def _environment(device: bool) -> tuple[dict[str, str], Path, Path]:
    """(env, model folder, work folder): the device's carried stack, or this checkout's train env."""
    if device:
        import device_ray

        env = device_ray.device_env()
        return env, device_ray.smollm2_dir(), device_ray.WORK / "cpu-threads"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                         if p)}
    return env, ROOT / ".cache" / "models" / "smollm2-135m", Path("/tmp") / "e2e-cpu-threads"


def _profile(work: Path, name: str, model: Path, threads: int | str) -> Path:
    profile = yaml.safe_load((ROOT / "configs" / "profiles" / "local.yaml").read_text())
    root = work / "store" / name
    data = root / "data" / profile["data"]["dataset"]
    if not (data / "dataset_info.json").is_file():
        packed = _device.LOCAL_DATA_DIR.with_name(f"{_device.LOCAL_DATA_DIR.name}.tar.gz")  # device_ray prepare
        if not _device.LOCAL_DATA_DIR.is_dir() and packed.is_file():
            with tarfile.open(packed) as tar:
                tar.extractall(_device.LOCAL_DATA_DIR.parent, filter="data")
        source = _device.LOCAL_DATA_DIR if _device.LOCAL_DATA_DIR.is_dir() else _device.write_dataset("local")
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, data)
    profile["model"]["source"] = str(model)
    profile["storage"]["root"] = str(root)
    profile["train"]["cpu_threads_per_worker"] = threads
    path = work / "cpu-profiles" / f"{name}.yaml"  # not in a dir named profiles: paths resolve from the cwd
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(profile, sort_keys=False))
    return path


def _cpu_cgroup(cpus: float) -> Path:
    """A cgroup (v1 cpu or v2) whose processes share ``cpus`` CPUs' worth of time."""
    name = f"e2e-cpu-threads-{uuid.uuid4().hex[:6]}"
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    quota = int(cpus * 100000)
    if (v1 / "cpu.cfs_quota_us").exists():
        (v1 / name).mkdir()
        (v1 / name / "cpu.cfs_period_us").write_text("100000")
        (v1 / name / "cpu.cfs_quota_us").write_text(str(quota))
        return v1 / name
    (v2 / name).mkdir()
    (v2 / name / "cpu.max").write_text(f"{quota} 100000")
    return v2 / name


def _train(name: str, threads: int | str, ns: argparse.Namespace, env: dict, model: Path, work: Path,
           cgroup: Path | None) -> dict:
    from device_ray import _steady, _tb_times

    run_id = f"{name}-{uuid.uuid4().hex[:4]}"
    profile = _profile(work, name, model, threads)
    cmd = [sys.executable, "-m", "e2e_llm.cli", "train", "--profile", str(profile), "--run-id", run_id,
           "--ray-temp-dir", str(work / "ray"), "--set", f"max_steps={ns.steps}"]
    if cgroup is not None:  # the command and all it starts (Ray, the workers) inside the quota
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
    log = work / f"{name}.log"
    print("$", " ".join(cmd), flush=True)
    t = time.monotonic()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t
    run = Path(yaml.safe_load(profile.read_text())["storage"]["root"]) / "runs" / run_id
    if rc != 0:
        raise SystemExit(f"{name}: rc {rc}\n{_device.log_tail(log, 30)}")
    manifest = json.loads((run / "manifest.json").read_text())
    steady = _steady(_tb_times(run / "tensorboard"), skip=0)
    line = next((x for x in log.read_text().splitlines() if "compute threads a worker:" in x), "")
    return {"name": name, "setting": threads, "quota": ns.quota if cgroup else None, "wall_s": round(wall, 1),
            "threads": manifest.get("cpu_threads_per_worker"), "threads_line": line.strip(),
            "dtype": manifest["dtype"], "metrics": manifest["metrics"],
            "steady": {"first": steady[0], "last": steady[1], "seconds": steady[2],
                       "s_per_step": steady[2] / (steady[1] - steady[0])} if steady else None}


def machine() -> dict:
    from e2e_llm.host_cpus import cpu_budget
    from e2e_llm.precision import cpu_signals

    signals = cpu_signals()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu_model": model, "cpus": os.cpu_count(), "usable": cpu_budget().describe(),
            "cpu_capability": signals.capability, "bf16_features": list(signals.features)}


def run(ns: argparse.Namespace) -> int:
    _device.use_project_src()
    env, model, work = _environment(ns.device)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU machine: the GPU machine's card stays out of it
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = {"date": _device.today(), "steps": ns.steps, "machine": machine(), "runs": []}
    for threads in ns.threads:
        report["runs"].append(_train(f"t{threads}", int(threads) if threads.isdigit() else threads, ns, env,
                                     model, work, None))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if ns.quota:
        try:
            cgroup = _cpu_cgroup(ns.quota)
        except OSError as exc:  # no writable cgroup here: the runs above stand
            report["quota_error"] = repr(exc)
        else:
            try:
                for threads in ("auto", str(ns.quota_threads)):
                    report["runs"].append(_train(f"q{ns.quota:g}-t{threads}", int(threads) if threads.isdigit()
                                                 else threads, ns, env, model, work, cgroup))
            finally:
                cgroup.rmdir()
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    table(report)
    return 0


def table(report: dict) -> None:
    print(f"\n{report['machine']['cpu_model']}, {report['machine']['usable']}, {report['steps']} steps")
    print("| run | quota | threads a worker | s/step (steady) | manifest wall_time_s | command s | train loss (mean) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in report["runs"]:
        steady = f"{r['steady']['s_per_step']:.3f}" if r["steady"] else "-"
        m = r["metrics"]
        print(f"| {r['name']} | {r['quota'] or '-'} | {r['threads']} | {steady} | "
              f"{m['wall_time_s']} | {r['wall_s']} | {m.get('train_loss_mean') or 0:.4f} |")


def record(ns: argparse.Namespace) -> int:
    report = json.loads(Path(ns.report).read_text())
    table(report)
    runs = {r["name"]: r for r in report["runs"]}
    m = report["machine"]
    where = f"{m['cpu_model']}, {m['usable']}, torch capability {m['cpu_capability']}"
    rows = []

    def row(metric: str, value_run: str, baseline_run: str, what: str) -> None:
        if value_run in runs and baseline_run in runs and runs[value_run]["steady"] and runs[baseline_run]["steady"]:
            value = 1 / runs[value_run]["steady"]["s_per_step"]
            baseline = 1 / runs[baseline_run]["steady"]["s_per_step"]
            rows.append({"bench": "train_cpu_threads", "metric": metric, "value": round(value, 4),
                         "baseline": round(baseline, 4), "ratio": round(value / baseline, 3),
                         "machine": f"{where}; {what}", "date": report["date"]})

    row("steps_per_s_auto_vs_1_thread", "tauto", "t1",
        f"auto {runs.get('tauto', {}).get('threads')} vs 1 thread a worker, 2 workers, {report['steps']} steps")
    quota = [r for r in report["runs"] if r["quota"]]
    if len(quota) == 2:
        auto, blind = quota
        row("steps_per_s_auto_vs_affinity_share_under_quota", auto["name"], blind["name"],
            f"inside a {auto['quota']:g}-CPU quota: auto {auto['threads']} vs {blind['threads']} threads a worker")
    for r in rows:
        print(json.dumps(r))
    _device.append_results(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--threads", nargs="+", default=["1", "auto"], help="settings to run without a quota")
    p.add_argument("--quota", type=float, help="then auto and --quota-threads inside a cgroup of this many CPUs")
    p.add_argument("--quota-threads", type=int, default=8, help="the quota-blind count (the affinity's share)")
    p.add_argument("--device", action="store_true", help="on the GPU machine after device_ray.py setup")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=run)
    p = sub.add_parser("record")
    p.add_argument("report")
    p.set_defaults(fn=record)
    ns = parser.parse_args(argv)
    return ns.fn(ns)


if __name__ == "__main__":
    raise SystemExit(main())
