#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Training throughput: the project's cluster recipes vs the tutorial's, through LLaMA-Factory.

Effective (non-padding) tokens/s per GPU and MFU of configs/recipes/qwen2.5_7b_lora_sft_80gb.yaml
(and the 24gb one) against configs/recipes/qwen2.5_7b_lora_sft_tutorial.yaml, one GPU, the same
Qwen2.5-7B-shaped model with random weights (throughput does not depend on the values), the
VIGGO train rows, side by side in one device run. Each variant is a fresh process running
LLaMA-Factory 0.9.5's ``run_exp`` on the recipe with only deployment keys and ``max_steps``
overridden and the callbacks `e2e-llm train` adds (``e2e_llm.train_worker.training_callbacks``:
``e2e_llm.lora_autocast``; the try ``try:peft-input-casts`` leaves them out); a callback times
optimizer steps after warm-up with the GPU synchronised.

    MFU = tokens/s x 4N / peak    (N = base parameters; 4N = forward + activation gradients,
                                   LoRA has no base weight gradients; peak = dense bf16 spec)

Counting: with ``neat_packing`` on sdpa, LLaMA-Factory hands the Trainer a 4-D float mask,
and transformers' ``non_padding`` count sums that mask (a large negative number). The bench
counts a token where the mask's diagonal is "attend" (4-D), or where the 2-D mask is non-zero.

Steps (the model has no hub there: the tokenizer is SmolLM2's, template ``smollm2``):

    # 1. here: wheels (LLaMA-Factory + deps, py3.12), VIGGO splits, tokenizer into .device/
    .venv/train/bin/python bench/train_throughput.py prepare
    # 2. on the GPU machine (device `run`, carry .device/wheels .device/viggo .device/tok):
    python3 bench/train_throughput.py run --out $OUT          # ~7 min on one H200
    # 3. here: table + one JSON line per figure appended to bench/results.jsonl
    python3 bench/train_throughput.py record /work/.device/<files_at>/train_throughput.json
    #    (--rename cluster-80gb=cluster-80gb-before records a recipe measured before it changed)

``run --dry-run`` does the same with a tiny model and 3 steps (CPU is fine) to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device  # noqa: E402

TOK_DIR = _device.DEVICE_DIR / "tok"
TOKENIZER_SOURCE = _device.ROOT / ".cache" / "models" / "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
RECIPES = _device.ROOT / "configs" / "recipes"
TUTORIAL = "qwen2.5_7b_lora_sft_tutorial.yaml"
R80 = "qwen2.5_7b_lora_sft_80gb.yaml"
R24 = "qwen2.5_7b_lora_sft_24gb.yaml"

# Qwen2.5-7B-Instruct's shape (its config.json), random weights.
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, hidden_act="silu",
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
TINY = dict(QWEN25_7B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152)

# name, recipe, overrides, optimizer steps, warm-up steps left out of the timing.
VARIANTS = (
    dict(name="tutorial", recipe=TUTORIAL, overrides={}, steps=9, skip=3),
    dict(name="cluster-80gb", recipe=R80, overrides={}, steps=20, skip=5),
    dict(name="cluster-24gb", recipe=R24, overrides={}, steps=14, skip=4),
    dict(name="80gb+liger", recipe=R80, overrides={"enable_liger_kernel": True}, steps=20, skip=5),
    dict(name="80gb+liger@2048x4", recipe=R80,
         overrides={"enable_liger_kernel": True, "cutoff_len": 2048, "per_device_train_batch_size": 4},
         steps=20, skip=5),
    dict(name="80gb+liger@1024x8", recipe=R80,
         overrides={"enable_liger_kernel": True, "cutoff_len": 1024, "per_device_train_batch_size": 8},
         steps=20, skip=5),
)
# MFU tries on the committed 80gb recipe (issue #15). ``keep``: may go into the 80gb recipe if it
# wins (fits an 80 GB card, same training); the pseudo-variant ``80gb+combo`` (name it in --only,
# after the tries) runs the keepable winners merged.
TRIES = (
    dict(name="try:fused-adamw", recipe=R80, overrides={"optim": "adamw_torch_fused"}, steps=20, skip=5, keep=True),
    dict(name="try:512x16", recipe=R80, overrides={"cutoff_len": 512, "per_device_train_batch_size": 16},
         steps=20, skip=5, keep=True, group="shape"),
    dict(name="try:1024x10", recipe=R80, overrides={"per_device_train_batch_size": 10}, steps=20, skip=5, keep=True,
         group="shape"),
    dict(name="try:1024x16", recipe=R80, overrides={"per_device_train_batch_size": 16}, steps=20, skip=5,
         keep=False),  # ~100 GiB: H200 only
    dict(name="try:packing-no-neat", recipe=R80, overrides={"neat_packing": False}, steps=20, skip=5,
         keep=False),  # rows of a pack attend to each other: a different training
    dict(name="try:torch-compile", recipe=R80, overrides={"torch_compile": True}, steps=24, skip=10, keep=True,
         timeout=240),
    dict(name="try:peft-input-casts", recipe=R80, overrides={}, steps=20, skip=5, keep=False,
         peft_input_casts=True),  # the 80gb recipe as trained before e2e_llm.lora_autocast
)
COMBO_GAIN = 1.02  # a keepable try joins the combo when it beats the committed recipe by this much
FITS_80GB_GIB = 74.0
PROJECT = ("cluster-80gb", "cluster-24gb")  # the recipes as committed
BASELINE = "tutorial"
OVERHEAD_S = 70  # process start, dataset packing, 15 GB model load, adapter save


def peak_flops(gpu: str) -> float | None:
    """Dense bf16 spec of the card (None: unknown card, no MFU)."""
    name = gpu.upper()
    if "H100" in name and "PCIE" in name:
        return 756e12
    if "H100" in name and "NVL" in name:
        return 835e12
    if "H100" in name or "H200" in name or "GH200" in name:
        return 989e12
    if "A100" in name:
        return 312e12
    return None


# ---------------------------------------------------------------------------------------
# prepare (here)


def prepare(_: argparse.Namespace) -> int:
    _device.download_wheels()
    _device.write_dataset()
    TOK_DIR.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(TOKENIZER_SOURCE / name, TOK_DIR / name)
    size = sum(p.stat().st_size for d in (_device.WHEELS_DIR, _device.DATA_DIR, TOK_DIR) for p in d.rglob("*"))
    print(f"bundle ready: .device/wheels .device/viggo .device/tok ({size / 2**20:.1f} MiB)")
    return 0


# ---------------------------------------------------------------------------------------
# run (GPU machine)


def build_model(model_dir: Path, tiny: bool) -> None:
    """Child process: a random-weight Qwen2.5-7B-shaped checkpoint (bf16) + SmolLM2 tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**(TINY if tiny else QWEN25_7B))
    config.dtype = torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, max_shard_size="5GB")
    for name in TOKENIZER_FILES:
        shutil.copy2(TOK_DIR / name, model_dir / name)
    rope = getattr(model.config, "rope_parameters", None)
    (model_dir / "bench_model.json").write_text(json.dumps({"n_params": n_params, "rope": rope}) + "\n")


def _install_token_counter():
    """Count non-padding tokens for 2-D masks (0 = pad) and LLaMA-Factory's 4-D neat-packing masks."""
    import torch
    from transformers import Trainer

    totals = {"all": 0}

    def track(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":
            return
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is None:
            n = torch.tensor(ids.numel(), device=ids.device)
        elif mask.dim() == 4:  # [b, 1, L, L] additive: 0 where attention is allowed
            n = (torch.diagonal(mask[:, 0], dim1=-2, dim2=-1) == 0).sum()
        else:
            n = (mask != 0).sum()
        n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(n).sum().item())
        totals["all"] += ids.numel()

    Trainer._track_num_input_tokens = track
    return totals


KERNEL_KINDS = (  # (kind, substrings of a CUDA kernel's lower-cased name), first match wins
    ("attention", ("fmha", "flash", "attention")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma")),
    ("optimizer", ("multi_tensor", "adam")),
    ("liger (triton)", ("_rms_norm", "_swiglu", "_cross_entropy", "rope", "liger", "_triton")),
    ("copy/cast", ("copy", "cast", "convert", "cat_", "fill")),
    ("elementwise/reduce", ("elementwise", "vectorized", "reduce", "unrolled", "softmax", "dropout")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_summary(events, wall_s: float, steps: int, top: int = 25) -> dict:
    """Where a profiled window's GPU time went: the share of wall time the GPU ran kernels
    (``gpu_busy``; the rest it waited for the CPU), kernel time by kind, and the top kernels."""
    kernels: dict[str, tuple[float, int]] = {}
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
            if us > 0:
                t, n = kernels.get(e.key, (0.0, 0))
                kernels[e.key] = (t + us / 1e6, n + e.count)
    busy = sum(t for t, _ in kernels.values())
    kinds: dict[str, float] = {}
    for name, (t, _) in kernels.items():
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + t
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"steps": steps, "wall_s": wall_s, "kernel_s": busy, "gpu_busy": busy / wall_s if wall_s else None,
            "kernels_per_step": sum(n for _, n in kernels.values()) / max(1, steps),
            "by_kind_s_per_step": {k: v / max(1, steps) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": name[:120], "kind": kernel_kind(name), "s_per_step": t / max(1, steps),
                     "calls_per_step": n / max(1, steps)} for name, (t, n) in ranked]}


def run_variant(spec_file: Path) -> int:
    """Child process: one recipe through LLaMA-Factory, timed with a Trainer callback."""
    import torch
    from transformers import TrainerCallback

    _device.use_project_src()
    from e2e_llm.compat.llamafactory import read_recipe_file

    spec = json.loads(spec_file.read_text())
    totals = _install_token_counter()
    cuda = torch.cuda.is_available()

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen, totals["all"]))

    recipe = read_recipe_file(RECIPES / spec["recipe"])
    args = dict(recipe)
    args.update(spec["overrides"])
    for key in ("eval_steps", "per_device_eval_batch_size", "save_steps", "save_total_limit", "num_train_epochs"):
        args.pop(key, None)
    args.update(
        model_name_or_path=spec["model_dir"], template="smollm2", dataset_dir=str(_device.DATA_DIR),
        dataset="viggo-train", output_dir=spec["output_dir"], overwrite_output_dir=True,
        max_steps=spec["steps"], save_strategy="no", eval_strategy="no", do_eval=False, report_to="none",
        plot_loss=False, logging_steps=5, include_num_input_tokens_seen="non_padding",
        preprocessing_num_workers=min(16, os.cpu_count() or 1),
    )
    if not cuda:
        args.pop("bf16", None)
        args.pop("enable_liger_kernel", None)
    class Profile(TrainerCallback):
        """torch.profiler over the ``profile_steps`` steps after the timed ones (not timed)."""

        def __init__(self, first: int, last: int) -> None:
            self.first, self.last, self.prof, self.t0, self.summary = first, last, None, 0.0, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step + 1 == self.first:
                torch.cuda.synchronize()
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.prof is not None and state.global_step == self.last:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                try:  # a profiler that cannot summarise must not cost the variant's figures
                    self.summary = profile_summary(self.prof.key_averages(), wall, self.last - self.first + 1)
                except Exception as exc:  # noqa: BLE001
                    self.summary = {"error": f"{type(exc).__name__}: {exc}"}
                self.prof = None

    clock = Clock()
    callbacks = [clock]
    if not spec.get("peft_input_casts"):  # as `e2e-llm train` trains: what its worker adds besides Ray's report
        from e2e_llm.train_worker import training_callbacks

        callbacks += training_callbacks()
    profiled = spec.get("profile_steps", 0) if cuda else 0
    if profiled:
        profile = Profile(spec["steps"] + 1, spec["steps"] + profiled)
        args["max_steps"] = spec["steps"] + profiled
        callbacks.append(profile)
    from llamafactory.train.tuner import run_exp

    run_exp(args=args, callbacks=callbacks)

    marks = [m for m in clock.marks if m[0] <= spec["steps"]]
    skip = min(spec["skip"], len(marks) - 2)
    (s0, t0, n0, a0), (s1, t1, n1, a1) = marks[skip], marks[-1]
    result = {
        "steps_timed": s1 - s0, "seconds": t1 - t0, "tokens": n1 - n0, "tokens_all": a1 - a0,
        "tokens_per_s": (n1 - n0) / (t1 - t0), "s_per_step": (t1 - t0) / (s1 - s0),
        "tokens_per_step": (n1 - n0) / (s1 - s0), "padding_fraction": 1 - (n1 - n0) / max(1, a1 - a0),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "args": {k: args[k] for k in sorted(args) if k not in ("model_name_or_path", "dataset_dir", "output_dir")},
    }
    if profiled:
        result["profile"] = profile.summary
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    return 0


def run(ns: argparse.Namespace) -> int:
    start = time.monotonic()
    out = Path(ns.out or os.environ.get("OUT") or "/tmp/e2e-bench-out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    env = _device.install_wheels()
    gpu = _device.gpu_name()
    log = out / "train_throughput.log"
    me = [sys.executable, str(Path(__file__).resolve())]

    model_dir = Path(ns.model_dir) if ns.model_dir else work / ("qwen2.5-7b-shape-tiny" if ns.dry_run
                                                                 else "qwen2.5-7b-shape")
    if not (model_dir / "bench_model.json").is_file():
        t = time.monotonic()
        with log.open("a") as fh:
            subprocess.run([*me, "_build", str(model_dir)] + (["--tiny"] if ns.dry_run else []),
                           env=env, check=True, stdout=fh, stderr=subprocess.STDOUT)
        print(f"built {model_dir} in {time.monotonic() - t:.0f} s", flush=True)
    model_info = json.loads((model_dir / "bench_model.json").read_text())

    combo_variant = {"name": "80gb+combo", "recipe": R80, "overrides": None, "steps": 20, "skip": 5}
    by_name = {v["name"]: v for v in (*VARIANTS, *TRIES, combo_variant)}
    names = list(by_name)
    chosen = [by_name[n] for n in ns.only if n in by_name] if ns.only else list(VARIANTS)  # in --only's order
    unknown = set(ns.only or ()) - set(names)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; have {names}")
    results: dict[str, dict] = {}
    liger_ok = True
    for variant in chosen:
        if variant["overrides"] is None:  # the combo: decided by the tries above
            picked = combo(results)
            results["80gb+combo"] = {"combo_of": picked["names"]}
            if not picked["names"]:
                print("80gb+combo: no keepable try won; not run", flush=True)
                continue
            variant = dict(variant, overrides=picked["overrides"],
                           timeout=max((v.get("timeout", 0) for v in TRIES if v["name"] in picked["names"]),
                                       default=0) or None)
        spec = dict(variant, overrides=dict(variant["overrides"]), profile_steps=ns.profile_steps)
        if spec["overrides"].get("enable_liger_kernel") and not liger_ok:
            spec["overrides"].pop("enable_liger_kernel")
            spec["name"] = spec["name"].replace("+liger", "")
        if ns.dry_run:
            spec.update(steps=3, skip=1)
        left = ns.budget_s - (time.monotonic() - start)
        if left < OVERHEAD_S + 30:
            results[spec["name"]] = {"error": f"skipped: {left:.0f} s of budget left"}
            print(f"{spec['name']}: skipped ({left:.0f} s left)", flush=True)
            continue
        spec.update(model_dir=str(model_dir), output_dir=str(work / "out" / spec["name"]),
                    result=str(work / f"{spec['name']}.json"))
        spec_file = work / f"{spec['name']}.spec.json"
        spec_file.write_text(json.dumps(spec))
        Path(spec["result"]).unlink(missing_ok=True)
        vlog = work / f"{spec['name']}.log"
        t = time.monotonic()
        try:
            with vlog.open("w") as fh:
                rc = subprocess.run([*me, "_variant", str(spec_file)], env=env, stdout=fh,
                                    stderr=subprocess.STDOUT,
                                    timeout=min(left - 10, spec.get("timeout") or left)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        with log.open("a") as fh:
            fh.write(f"\n===== {spec['name']} rc={rc} {time.monotonic() - t:.0f} s\n{_device.log_tail(vlog, 60)}\n")
        if rc == 0 and Path(spec["result"]).is_file():
            results[spec["name"]] = {**results.get(spec["name"], {}), **json.loads(Path(spec["result"]).read_text()),
                                     "overrides": spec["overrides"]}
        else:
            results[spec["name"]] = {"error": f"rc={rc}: {_device.log_tail(vlog, 6)}"}
            if spec["overrides"].get("enable_liger_kernel"):
                liger_ok = False
        r = results[spec["name"]]
        shown = f"{r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else r["error"][-300:]
        print(f"{spec['name']}: {shown} ({time.monotonic() - t:.0f} s)", flush=True)
        shutil.rmtree(work / "out" / spec["name"], ignore_errors=True)

    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    sys.path.insert(0, str(_device.SITE))
    report = {
        "machine": gpu, "date": _device.today(), "dry_run": ns.dry_run, "n_params": model_info["n_params"],
        "peak_flops": peak_flops(gpu), "model_rope": model_info.get("rope"),
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "accelerate")},
        "variants": results, "wall_s": time.monotonic() - start,
    }
    (out / "train_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


def combo(results: dict[str, dict]) -> dict:
    """The keepable tries that beat the committed 80gb recipe by COMBO_GAIN and fit an 80 GB card,
    merged; of the tries in one group (the batch shape), only the fastest."""
    base = results.get("cluster-80gb", {}).get("tokens_per_s")
    winners = []
    for t in TRIES:
        r = results.get(t["name"], {})
        if base and t["keep"] and r.get("tokens_per_s", 0) >= base * COMBO_GAIN \
                and (r.get("peak_mem_gib") or 0) <= FITS_80GB_GIB:
            winners.append((r["tokens_per_s"], t))
    overrides: dict = {}
    names, groups = [], set()
    for _, t in sorted(winners, key=lambda w: -w[0]):  # fastest first; one try per group (the batch shape)
        group = t.get("group", t["name"])
        if group not in groups:
            groups.add(group)
            names.append(t["name"])
            overrides.update(t["overrides"])
    return {"names": names, "overrides": overrides}


# ---------------------------------------------------------------------------------------
# record (here)


def table(report: dict) -> str:
    base = report["variants"].get(BASELINE, {}).get("tokens_per_s")
    peak = report["peak_flops"]
    n = report["n_params"]
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"
    rows = [f"{report['machine']}  {report['date']}  N={n / 1e9:.3f}B  peak={peak_text}",
            f"{'variant':<22} {'tok/s':>8} {'x tut':>6} {'MFU':>6} {'tok/step':>9} {'s/step':>7} {'pad':>5} {'GiB':>6}"]
    for name, r in report["variants"].items():
        if "tokens_per_s" not in r:
            rows.append(f"{name:<22} {r.get('error', '')[:120]}")
            continue
        tps = r["tokens_per_s"]
        mfu = f"{tps * 4 * n / peak:6.1%}" if peak else "     -"
        ratio = f"{tps / base:6.2f}" if base else "     -"
        mem = f"{r['peak_mem_gib']:6.1f}" if r.get("peak_mem_gib") is not None else "     -"
        rows.append(f"{name:<22} {tps:8.0f} {ratio} {mfu} {r['tokens_per_step']:9.0f} {r['s_per_step']:7.3f} "
                    f"{r['padding_fraction']:5.1%} {mem}")
    for name, r in report["variants"].items():
        prof = r.get("profile")
        if prof and "error" in prof:
            rows.append(f"{name}: profile failed: {prof['error'][:200]}")
        elif prof:
            kinds = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in prof["by_kind_s_per_step"].items())
            rows.append(f"{name}: profiled {prof['steps']} steps: GPU busy {prof['gpu_busy']:.0%} of "
                        f"{prof['wall_s'] / prof['steps'] * 1e3:.0f} ms a step, {prof['kernels_per_step']:.0f} "
                        f"kernels a step; ms a step by kind: {kinds}")
    return "\n".join(rows)


def record(ns: argparse.Namespace) -> int:
    report = json.loads(Path(ns.report).read_text())
    for item in ns.rename:  # e.g. a recipe measured before it changed: cluster-80gb=cluster-80gb-before
        old, _, new = item.partition("=")
        report["variants"] = {new if k == old else k: v for k, v in report["variants"].items()}
    print(table(report))
    if report.get("dry_run"):
        print("dry run: nothing recorded")
        return 0
    variants = {k: v for k, v in report["variants"].items() if not ns.only or k in ns.only}
    base = report["variants"].get(ns.baseline, {})
    if "tokens_per_s" not in base:
        raise SystemExit(f"baseline {ns.baseline!r} has no figure: {base.get('error')}")
    against = "" if ns.baseline == BASELINE else f"_vs_{ns.baseline.removeprefix('try:')}"
    peak, n = report["peak_flops"], report["n_params"]
    lines = []
    for name, r in variants.items():
        if "tokens_per_s" not in r:
            continue
        settings = ", ".join(f"{k}={r['args'][k]}" for k in (
            "cutoff_len", "packing", "neat_packing", "per_device_train_batch_size", "gradient_accumulation_steps",
            "disable_gradient_checkpointing", "enable_liger_kernel") if k in r["args"])
        common = {"machine": report["machine"], "date": report["date"],
                  "settings": f"{name}: {settings}; {r['steps_timed']} steps timed, peak {r['peak_mem_gib']:.1f} GiB"}
        tps, btps = r["tokens_per_s"], base["tokens_per_s"]
        lines.append({"bench": "train_throughput", "metric": f"tokens_per_s_per_gpu/{name}{against}",
                      "value": round(tps, 1), "baseline": round(btps, 1), "ratio": round(tps / btps, 3), **common})
        if peak:
            mfu, bmfu = tps * 4 * n / peak, btps * 4 * n / peak
            lines.append({"bench": "train_throughput", "metric": f"mfu/{name}{against}", "value": round(mfu, 4),
                          "baseline": round(bmfu, 4), "ratio": round(mfu / bmfu, 3), **common})
    _device.append_results(lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="wheels, dataset and tokenizer into .device/ (here)")
    p = sub.add_parser("run", help="train every variant on this GPU and write train_throughput.json")
    p.add_argument("--out", help="output folder (default $OUT)")
    p.add_argument("--work", default="/tmp/e2e-bench", help="model and scratch folder (local disk)")
    p.add_argument("--budget-s", type=float, default=560, help="skip variants that would not finish in time")
    p.add_argument("--only", nargs="*", help="variant names to run, in this order (default: all; "
                   "80gb+combo: the keepable winning tries merged)")
    p.add_argument("--dry-run", action="store_true", help="tiny model, 3 steps: plumbing check")
    p.add_argument("--model-dir", help="an existing 7B-shaped model (device_ray.py setup --7b builds one)")
    p.add_argument("--profile-steps", type=int, default=0, help="after the timed steps, this many more under "
                   "torch.profiler: GPU busy share and kernel time by kind in the report (GPU only)")
    p = sub.add_parser("record", help="append the figures of a run to bench/results.jsonl (here)")
    p.add_argument("report", help="train_throughput.json from `run`")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW", help="record a variant as NEW")
    p.add_argument("--only", nargs="*", help="variant names to record (default: all measured)")
    p.add_argument("--baseline", default=BASELINE, help="the variant of the same run each figure is compared with "
                   f"(default {BASELINE}; another one is named in the metric)")
    p = sub.add_parser("_build")
    p.add_argument("model_dir")
    p.add_argument("--tiny", action="store_true")
    p = sub.add_parser("_variant")
    p.add_argument("spec")
    ns = parser.parse_args(argv)
    if ns.cmd == "prepare":
        return prepare(ns)
    if ns.cmd == "run":
        return run(ns)
    if ns.cmd == "record":
        return record(ns)
    if ns.cmd == "_build":
        build_model(Path(ns.model_dir), ns.tiny)
        return 0
    return run_variant(Path(ns.spec))


if __name__ == "__main__":
    sys.exit(main())
