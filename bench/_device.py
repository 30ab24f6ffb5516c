# SPDX-License-Identifier: Apache-2.0
"""Shared plumbing for the GPU benches (train_throughput.py, train_quality.py).

A bench runs in three steps: ``prepare`` (here: wheels, dataset, tokenizer into the
git-ignored ``.device/`` folder, which travels to the GPU machine as carried paths),
``run`` (on the GPU machine: install the wheels with ``--no-deps``, train through
LLaMA-Factory, write JSON under ``$OUT``) and ``record`` (here: append the figures to
bench/results.jsonl). The GPU machine has torch/transformers/peft but no LLaMA-Factory and
no network, so everything it needs travels in ``.device/``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_DIR = ROOT / ".device"
WHEELS_DIR = DEVICE_DIR / "wheels"
DATA_DIR = DEVICE_DIR / "viggo"
LOCAL_DATA_DIR = DEVICE_DIR / "viggo-local"
RESULTS = ROOT / "bench" / "results.jsonl"
SITE = Path("/tmp/e2e-site")

TRAIN_LOCK = ROOT / "images" / "train" / "requirements.lock"
# LLaMA-Factory and what the GPU image lacks (it has torch, transformers, peft, accelerate,
# pyarrow, pandas...), at the train lock's versions (train_lock_specs); liger-kernel is for the
# fused-kernel variant, gguf for the SmolLM2 model.
WHEELS = ("llamafactory", "datasets", "dill", "multiprocess", "trl", "omegaconf", "fire", "tyro", "docstring-parser",
          "shtab", "termcolor", "liger-kernel", "gguf")


def train_lock_specs(names: tuple[str, ...]) -> list[str]:
    """``name==version`` for each name, at the version images/train/requirements.lock pins (the
    one pin list: a lock bump reaches the GPU machine too); an error naming any it does not pin."""
    use_project_src()
    from e2e_llm.pins import canonical_name, lock_pins

    pins = lock_pins(TRAIN_LOCK)
    missing = [name for name in names if canonical_name(name) not in pins]
    if missing:
        raise SystemExit(f"{TRAIN_LOCK.relative_to(ROOT)} pins no {', '.join(missing)}: the GPU machine installs "
                         f"what the train image installs")
    return [f"{name}=={pins[canonical_name(name)]}" for name in names]


def download_wheels() -> None:
    WHEELS_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "any", "-d", str(WHEELS_DIR),
           *train_lock_specs(WHEELS)]
    subprocess.run(cmd, check=True)


def write_dataset(like: str = "cluster") -> Path:
    """The VIGGO splits as the training stage sees them (e2e-llm data: alpaca rows plus
    dataset_info.json with system=instruction, prompt=input, response=output), as profile ``like``
    asks for them: the cluster's VIGGO instruction (``DATA_DIR``) or the local profile's short
    system prompt (``LOCAL_DATA_DIR``; the training stage refuses a dataset written for another one)."""
    import yaml

    cli = Path(sys.executable).with_name("e2e-llm")
    if not cli.exists():
        cli = Path(shutil.which("e2e-llm") or "e2e-llm")
    profile = yaml.safe_load((ROOT / "configs" / "profiles" / "local.yaml").read_text())
    dest = LOCAL_DATA_DIR if like == "local" else DATA_DIR
    if like == "cluster":
        cluster = yaml.safe_load((ROOT / "configs" / "profiles" / "cluster.yaml").read_text())
        profile["data"]["system_prompt"] = cluster["data"].get("system_prompt")
    profile_path = DEVICE_DIR / f"{dest.name}-data.yaml"  # not in a dir named profiles: paths resolve from the cwd
    DEVICE_DIR.mkdir(parents=True, exist_ok=True)
    profile_path.write_text(yaml.safe_dump(profile, sort_keys=False))
    tmp = DEVICE_DIR / f"{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([str(cli), "data", "--profile", str(profile_path), "--output", str(tmp)], check=True, cwd=ROOT)
    shutil.rmtree(tmp / "raw", ignore_errors=True)  # the untouched source copies are not needed there
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def install_wheels() -> dict[str, str]:
    """Install the carried wheels (no deps, no index) and return the env children need."""
    env = dict(os.environ)
    if importlib.util.find_spec("llamafactory") is None:
        wheels = sorted(str(p) for p in WHEELS_DIR.glob("*.whl"))
        if not wheels:
            raise SystemExit(f"no wheels under {WHEELS_DIR}: run `prepare` first and carry .device/wheels")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), env.get("PYTHONPATH", "")) if p)
    env.update(DISABLE_VERSION_CHECK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true", PYTHONUNBUFFERED="1",
               HF_HOME=env.get("HF_HOME", "/tmp/e2e-hf"))
    return env


def use_project_src() -> None:
    """Make this checkout's ``e2e_llm`` importable in a child process on the GPU machine, where it
    is not installed (the carried wheels are LLaMA-Factory's stack, not the project)."""
    src = str(ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        if names:
            return names[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ('' where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return ""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a run's log (empty when it was never written), for error rows."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def append_results(lines: list[dict]) -> None:
    """Append (never rewrite: the file is shared by every bench) one JSON object a line."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    print(f"appended {len(lines)} lines to {RESULTS}")
