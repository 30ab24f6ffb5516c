#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""CPU training threads on a machine with more cores than ours, or fewer than it shows: `e2e-llm
train` of the local profile with each worker's CPU reservation (``train.resources_per_worker.CPU``,
which sets its OpenMP / torch threads) at 1 (the local profile's) and more, and optionally inside a
cgroup CPU quota (a container's ``--cpus``).

Each setting is one unchanged `e2e-llm train` of the local profile with only the model source,
the storage root and ``resources_per_worker`` changed, ``--set max_steps=N``; step time is the
steady part (TensorBoard wall times of the logged steps after the first). All settings run in one
call, back to back, on the same machine. Inside a quota, a setting whose workers reserve more
CPUs than the quota leaves is refused by `e2e-llm train` before any worker starts (the report
keeps the message). The session-34 figures in bench/RESULTS.md ("train_cpu_threads") came from
this script's first version (commit db0bc95), which set the threads through a profile key that
was then dropped, and could also force more threads than a quota leaves.

    # here (train env), or on the GPU machine with the GPU hidden after device_ray.py's setup:
    python bench/train_cpu_threads.py run --steps 48 --cpus 1 4 8 --out /tmp/cpu-threads [--device] \
        [--quota 4 --quota-cpus 1 2]
    # here: table, bench/results.jsonl rows (train_cpu_threads), from the report
    .venv/serve/bin/python bench/train_cpu_threads.py record /tmp/cpu-threads/report.json
"""

from __future__ import annotations

import argparse
import json
import os
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


def _profile(work: Path, name: str, model: Path, cpus: int) -> Path:
    profile = yaml.safe_load((ROOT / "configs" / "profiles" / "local.yaml").read_text())
    root = work / "store" / name
    data = root / "data" / profile["data"]["dataset"]
    if not (data / "dataset_info.json").is_file():
        packed = _device.LOCAL_DATA_DIR.with_name(f"{_device.LOCAL_DATA_DIR.name}.tar.gz")  # device_ray prepare
        if not _device.LOCAL_DATA_DIR.is_dir() and packed.is_file():
            with tarfile.open(packed) as tar:
                from e2e_llm.archives import extract_all

                extract_all(tar, _device.LOCAL_DATA_DIR.parent)
        source = _device.LOCAL_DATA_DIR if _device.LOCAL_DATA_DIR.is_dir() else _device.write_dataset("local")
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, data)
    profile["model"]["source"] = str(model)
    profile["storage"]["root"] = str(root)
    profile["train"]["resources_per_worker"] = {"CPU": cpus}
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


def _train(name: str, cpus: int, ns: argparse.Namespace, env: dict, model: Path, work: Path,
           cgroup: Path | None) -> dict:
    from device_ray import _steady, _tb_times

    run_id = f"{name}-{uuid.uuid4().hex[:4]}"
    profile = _profile(work, name, model, cpus)
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
    row = {"name": name, "threads": cpus, "quota": ns.quota if cgroup else None, "wall_s": round(wall, 1)}
    if rc != 0:
        refused = next((x for x in log.read_text().splitlines() if "resources_per_worker" in x), None)
        if refused is None:
            raise SystemExit(f"{name}: rc {rc}\n{_device.log_tail(log, 30)}")
        return {**row, "refused": refused.strip(), "steady": None}
    run = Path(yaml.safe_load(profile.read_text())["storage"]["root"]) / "runs" / run_id
    manifest = json.loads((run / "manifest.json").read_text())
    steady = _steady(_tb_times(run / "tensorboard"), skip=0)
    return {**row, "dtype": manifest["dtype"], "metrics": manifest["metrics"],
            "steady": {"first": steady[0], "last": steady[1], "seconds": steady[2],
                       "s_per_step": steady[2] / (steady[1] - steady[0])} if steady else None}


def machine() -> dict:
    from e2e_llm.host_cpus import cpu_budget
    from e2e_llm.precision import cpu_signals

    signals = cpu_signals()
    return {"cpu_model": _device.cpu_model(), "cpus": os.cpu_count(), "usable": cpu_budget().describe(),
            "cpu_capability": signals.capability, "bf16_features": list(signals.features)}


def run(ns: argparse.Namespace) -> int:
    _device.use_project_src()
    env, model, work = _environment(ns.device)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU machine: the GPU machine's card stays out of it
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    report = {"date": _device.today(), "steps": ns.steps, "machine": machine(), "runs": []}
    for cpus in ns.cpus:
        report["runs"].append(_train(f"t{cpus}", cpus, ns, env, model, work, None))
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
                for cpus in ns.quota_cpus:
                    report["runs"].append(_train(f"q{ns.quota:g}-t{cpus}", cpus, ns, env, model, work, cgroup))
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
        if r.get("refused"):
            print(f"| {r['name']} | {r['quota'] or '-'} | {r['threads']} | refused: {r['refused']} | | | |")
            continue
        steady = f"{r['steady']['s_per_step']:.3f}" if r["steady"] else "-"
        m = r["metrics"]
        print(f"| {r['name']} | {r['quota'] or '-'} | {r['threads']} | {steady} | "
              f"{m['wall_time_s']} | {r['wall_s']} | {m.get('train_loss_mean') or 0:.4f} |")


def record(ns: argparse.Namespace) -> int:
    report = json.loads(Path(ns.report).read_text())
    table(report)
    ran = [r for r in report["runs"] if r.get("steady")]
    m = report["machine"]
    where = f"{m['cpu_model']}, {m['usable']}, torch capability {m['cpu_capability']}"
    rows = []

    def row(metric: str, value_run: dict, baseline_run: dict, what: str) -> None:
        value, baseline = (1 / r["steady"]["s_per_step"] for r in (value_run, baseline_run))
        rows.append({"bench": "train_cpu_threads", "metric": metric, "value": round(value, 4),
                     "baseline": round(baseline, 4), "ratio": round(value / baseline, 3),
                     "machine": f"{where}; {what}", "date": report["date"]})

    free = [r for r in ran if not r["quota"]]
    one = next((r for r in free if r["threads"] == 1), None)
    for r in free:
        if one and r is not one:
            row(f"steps_per_s_{r['threads']}_vs_1_thread_a_worker", r, one,
                f"2 workers, {report['steps']} steps, steady steps {r['steady']['first']}-{r['steady']['last']}")
    quota = sorted((r for r in ran if r["quota"]), key=lambda r: r["threads"])
    if len(quota) >= 2:
        few, many = quota[0], quota[-1]
        row(f"steps_per_s_under_quota_{few['threads']}_vs_{many['threads']}_threads_a_worker", few, many,
            f"inside a {few['quota']:g}-CPU quota, 2 workers, {report['steps']} steps")
    for r in rows:
        print(json.dumps(r))
    _device.append_results(rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--cpus", nargs="+", type=int, default=[1, 4], help="CPUs (threads) a worker, without a quota")
    p.add_argument("--quota", type=float, help="then --quota-cpus inside a cgroup of this many CPUs")
    p.add_argument("--quota-cpus", nargs="+", type=int, default=[1, 2])
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
