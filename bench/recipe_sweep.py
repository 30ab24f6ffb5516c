#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Quality sweep of the LOCAL CPU recipe, run on a GPU where each training takes seconds.

configs/recipes/smollm2_lora_sft_local.yaml (SmolLM2-135M-Instruct, LoRA r16, 224 rows, batch 4,
1 epoch) is sized for 2 CPU cores; issue #11 wants exact match >= 0.20 and slot F1 >= 0.60 on val
at about the same CPU cost. CPU training cost ~ tokens processed = rows x epochs x ~240 tokens,
so each grid point states its cost relative to the recipe (``cost``). Every point is the recipe
file with only the ``GRID`` overrides and the deployment keys changed (model, dataset dir, output,
``bf16``, ``seed 42``, no saving/reporting), trained with LLaMA-Factory's ``run_exp`` on the
VIGGO train rows as ``e2e-llm data`` writes them (the first ``max_samples`` rows, template
``smollm2``). Each adapter is merged and scored on the first ``--eval-rows`` val rows with greedy
HF ``generate`` (batched, left padding, ``max_new_tokens`` 96, the chat template with the row's
instruction as system prompt and its input as user message, as the batch stage builds it) and
the project's scorer (``e2e_llm.evaluate``). Unlike the batch stage there is no
grammar-constrained decoding here, so ``valid_mr_rate`` can be below 1.

Points run ``--workers`` at a time (the 135M model is launch-bound on a GPU: a step takes ~0.26 s
whatever the batch), so ``train_s`` is under that much sharing: compare steps and ``cost``.

    # GPU machine, after `bench/device_ray.py setup` (it installs LLaMA-Factory and rebuilds
    # SmolLM2 into /tmp/e2e-gpu/models/smollm2-135m); writes sweep.json + sweep.md under $OUT:
    cd .device/gpu/repo && python3 bench/recipe_sweep.py run --workers 6     # round 1 (GRID up to ROUND2)
    cd .device/gpu/repo && python3 bench/recipe_sweep.py run --round 2 --workers 6  # round 2 (3, 4, 5 alike)
    # here: the table again (markdown) from the report
    python3 bench/recipe_sweep.py table /work/.device/<files_at>/sweep.json
    # CPU plumbing check (train env, local model): two points, 8 rows, 4 val rows
    .venv/train/bin/python bench/recipe_sweep.py run --dry-run --model .cache/models/smollm2-135m --only base
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _device  # noqa: E402

ROOT = _device.ROOT
RECIPE = ROOT / "configs" / "recipes" / "smollm2_lora_sft_local.yaml"
TASK = ROOT / "configs" / "tasks" / "viggo.yaml"
DEFAULT_MODEL = Path(os.environ.get("E2E_GPU_WORK", "/tmp/e2e-gpu")) / "models" / "smollm2-135m"
METRICS = ("exact_match", "slot_f1", "function_accuracy", "valid_mr_rate")

SHORT_SYSTEM = "Write the meaning representation of the sentence."
PROMPT_KEYS = ("_system", "_eval_system")  # sweep-only keys, not LLaMA-Factory's


def _short(rows: int, per_step: int, lr: float, **extra) -> dict:
    """A point with the short system prompt: rows, rows per optimizer step, learning rate."""
    return {"_system": "SHORT", "max_samples": rows, "per_device_train_batch_size": per_step, "learning_rate": lr,
            **extra}


# name -> overrides of the local recipe. `cost` is computed: rows x epochs / (224 x 1).
GRID: dict[str, dict] = {  # in run order: the longest (batch 1, more rows) first, so the last wave is short
    "base": {},
    "bs1-lr1e-3": {"per_device_train_batch_size": 1, "learning_rate": 1e-3},
    "bs1-lr2e-3": {"per_device_train_batch_size": 1},
    "neatpack-bs1": {"packing": True, "neat_packing": True, "per_device_train_batch_size": 1},
    "rows640": {"max_samples": 640},
    "rows448": {"max_samples": 448},
    "rows224-ep2": {"num_train_epochs": 2.0},
    "bs2-lr2e-3": {"per_device_train_batch_size": 2},
    "bs2-lr3e-3": {"per_device_train_batch_size": 2, "learning_rate": 3e-3},
    "bs2-loraplus16-lr5e-4": {"per_device_train_batch_size": 2, "loraplus_lr_ratio": 16.0, "learning_rate": 5e-4},
    "bs2-r32a64": {"per_device_train_batch_size": 2, "lora_rank": 32, "lora_alpha": 64},
    "rows320": {"max_samples": 320},
    "neatpack-bs2": {"packing": True, "neat_packing": True, "per_device_train_batch_size": 2},
    "bs4-lr4e-3": {"learning_rate": 4e-3},
    "loraplus16-lr5e-4": {"loraplus_lr_ratio": 16.0, "learning_rate": 5e-4},
    "loraplus16-lr1e-3": {"loraplus_lr_ratio": 16.0, "learning_rate": 1e-3},
    "r32a64": {"lora_rank": 32, "lora_alpha": 64},
    # second round (same session): the first round's best settings at <= 1.3x the cost, and seed noise
    "bs2-lr3e-3-rows288": {"per_device_train_batch_size": 2, "learning_rate": 3e-3, "max_samples": 288},
    "bs1-lr2e-3-rows288": {"per_device_train_batch_size": 1, "max_samples": 288},
    "bs1-lr1.5e-3-rows288": {"per_device_train_batch_size": 1, "learning_rate": 1.5e-3, "max_samples": 288},
    "bs2-lr3e-3-rows256": {"per_device_train_batch_size": 2, "learning_rate": 3e-3, "max_samples": 256},
    "bs2-lr4e-3-rows288": {"per_device_train_batch_size": 2, "learning_rate": 4e-3, "max_samples": 288},
    "bs2-lr4e-3": {"per_device_train_batch_size": 2, "learning_rate": 4e-3},
    "bs1-lr3e-3": {"per_device_train_batch_size": 1, "learning_rate": 3e-3},
    "bs2-lr3e-3-r32a64-rows288": {"per_device_train_batch_size": 2, "learning_rate": 3e-3, "lora_rank": 32,
                                  "lora_alpha": 64, "max_samples": 288},
    "bs2-lr3e-3-constant-rows288": {"per_device_train_batch_size": 2, "learning_rate": 3e-3, "max_samples": 288,
                                    "lr_scheduler_type": "constant_with_warmup"},
    "bs2-lr3e-3-seed1": {"per_device_train_batch_size": 2, "learning_rate": 3e-3, "seed": 1},
    "bs2-lr3e-3-seed2": {"per_device_train_batch_size": 2, "learning_rate": 3e-3, "seed": 2},
    "base-seed1": {"seed": 1},
    # third round (next session): a short system prompt. The instruction is ~150 of a row's ~240
    # tokens; a short one makes each row ~2.7x cheaper to train on CPU, so ~640 rows cost what 256
    # long rows do. `_system` replaces every row's instruction (train and scoring), `_eval_system`
    # only at scoring (an adapter trained short, asked with the long instruction). Learning rates are
    # stated: the recipe's was 3e-3 then.
    "short-rows640-bs2-lr3e-3": _short(640, 2, 3e-3),
    "short-rows768-bs2-lr3e-3": _short(768, 2, 3e-3),
    "short-rows512-bs2-lr3e-3": _short(512, 2, 3e-3),
    "short-rows640-bs4-lr2e-3": _short(640, 4, 2e-3),
    "short-rows640-bs4-lr4e-3": _short(640, 4, 4e-3),
    "short-rows640-bs2-lr2e-3": _short(640, 2, 2e-3),
    "short-rows640-bs2-lr3e-3-seed1": _short(640, 2, 3e-3, seed=1),
    "short-rows640-bs2-lr3e-3-seed2": _short(640, 2, 3e-3, seed=2),
    "short-rows640-bs2-lr3e-3-asklong": _short(640, 2, 3e-3, _eval_system=None),
    "long-rows640-bs2-lr3e-3": {"max_samples": 640, "per_device_train_batch_size": 2, "learning_rate": 3e-3},
    "short-rows1024-bs4-lr4e-3": _short(1024, 4, 4e-3),
    # fourth round: fewer optimizer steps (a CPU step costs ~0.6 s beyond its tokens) and LoRA on the
    # top layers only (the backward pass then stops at the lowest adapted layer: fewer FLOPs a token)
    "short-rows640-bs2-lr2e-3-seed1": _short(640, 2, 2e-3, seed=1),
    "short-rows640-bs2-lr2e-3-seed2": _short(640, 2, 2e-3, seed=2),
    "short-rows640-bs4-lr4e-3-seed1": _short(640, 4, 4e-3, seed=1),
    "short-rows640-bs4-lr3e-3": _short(640, 4, 3e-3),
    "short-rows512-bs2-lr2e-3": _short(512, 2, 2e-3),
    "short-rows512-bs4-lr4e-3": _short(512, 4, 4e-3),
    "short-rows640-bs2-lr2e-3-top15": _short(640, 2, 2e-3, lora_target="TOP15"),
    "short-rows640-bs4-lr4e-3-top15": _short(640, 4, 4e-3, lora_target="TOP15"),
    "short-rows640-bs2-lr2e-3-top10": _short(640, 2, 2e-3, lora_target="TOP10"),
    "short-rows768-bs4-lr4e-3-top15": _short(768, 4, 4e-3, lora_target="TOP15"),
    # fifth round: the row count that fits 15 minutes on 2 AVX2 cores (640 rows trained in ~10 min there)
    "short-rows576-bs2-lr2e-3": _short(576, 2, 2e-3),
    "short-rows576-bs2-lr2e-3-seed1": _short(576, 2, 2e-3, seed=1),
    "short-rows576-bs2-lr2e-3-seed2": _short(576, 2, 2e-3, seed=2),
    "short-rows512-bs2-lr2e-3-seed1": _short(512, 2, 2e-3, seed=1),
    "short-rows512-bs2-lr2e-3-seed2": _short(512, 2, 2e-3, seed=2),
    "short-rows544-bs2-lr2e-3": _short(544, 2, 2e-3),
}
# Each round runs from its first point to the next round's first point.
ROUND_STARTS = ("base", "bs2-lr3e-3-rows288", "short-rows640-bs2-lr3e-3", "short-rows640-bs2-lr2e-3-seed1",
                "short-rows576-bs2-lr2e-3")
_ORDER = list(GRID)
_BOUNDS = [_ORDER.index(name) for name in ROUND_STARTS] + [len(_ORDER)]
ROUNDS = [_ORDER[a:b] for a, b in zip(_BOUNDS, _BOUNDS[1:])]
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def _lora_target(value: str, num_layers: int = 30) -> str:
    """``TOP<k>``: every linear layer of the top k decoder layers, as LLaMA-Factory's comma list."""
    if not value.startswith("TOP"):
        return value
    first = num_layers - int(value[3:])
    return ",".join(f"layers.{i}.{m}" for i in range(first, num_layers) for m in LINEAR)


def cost(recipe: dict, overrides: dict) -> float:
    """Rows x epochs relative to the recipe (long prompt); `token_cost` in each result counts tokens."""
    args = {**recipe, **{k: v for k, v in overrides.items() if k not in PROMPT_KEYS}}
    return args["max_samples"] * args["num_train_epochs"] / (recipe["max_samples"] * recipe["num_train_epochs"])


# ---------------------------------------------------------------------------------------
# one point (child process)


def _system_of(value: str | None) -> str | None:
    return SHORT_SYSTEM if value == "SHORT" else value


def _with_system(rows: list[dict], system: str | None) -> list[dict]:
    return rows if system is None else [{**row, "instruction": system} for row in rows]


def _train_tokens(tok, rows: list[dict]) -> int:
    return sum(len(tok.apply_chat_template(
        [{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]},
         {"role": "assistant", "content": r["output"]}], tokenize=True, return_dict=True)["input_ids"])
        for r in rows)


def _prompts(tokenizer, rows: list[dict], default_instruction: str | None) -> list[str]:
    """The batch stage's chat (system = instruction, user = input), rendered by the chat template."""
    return [tokenizer.apply_chat_template(
        [{"role": "system", "content": row.get("instruction") or default_instruction},
         {"role": "user", "content": row["input"]}], tokenize=False, add_generation_prompt=True) for row in rows]


def generate(model_dir: str, adapter: str | None, rows: list[dict], default_instruction: str | None,
             max_new_tokens: int, batch_size: int) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to("cuda" if cuda else "cpu").eval()
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    prompts = _prompts(tok, rows, default_instruction)
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        with torch.inference_mode():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return out


def run_point(spec_file: Path) -> int:
    import torch

    spec = json.loads(spec_file.read_text())
    _device.use_project_src()
    from e2e_llm.compat.llamafactory import read_recipe_file

    recipe = read_recipe_file(RECIPE)
    args = dict(recipe)
    args.update({k: v for k, v in spec["overrides"].items() if k not in PROMPT_KEYS})
    args["lora_target"] = _lora_target(str(args["lora_target"]))
    train_system = _system_of(spec["overrides"].get("_system"))
    eval_system = _system_of(spec["overrides"].get("_eval_system", spec["overrides"].get("_system")))
    dataset_rows = [json.loads(x) for x in Path(spec["data"], "train.jsonl").read_text().splitlines() if x.strip()]
    train_rows, data_dir = dataset_rows, spec["data"]
    if train_system is not None:  # a copy of the dataset folder with the instruction replaced
        data_dir = str(Path(spec["output_dir"]).parent / f"data-{spec['name']}")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        for f in Path(spec["data"]).iterdir():
            if f.is_file() and f.name != "train.jsonl":
                (Path(data_dir) / f.name).write_bytes(f.read_bytes())
        train_rows = _with_system(train_rows, train_system)
        (Path(data_dir) / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    n_rows = int(spec.get("max_samples") or args["max_samples"])
    token_cost = (_train_tokens(tok, train_rows[:n_rows]) * float(args["num_train_epochs"])
                  / (_train_tokens(tok, dataset_rows[:int(recipe["max_samples"])]) * float(recipe["num_train_epochs"])))
    for key in ("save_steps", "save_total_limit"):
        args.pop(key, None)
    cuda = torch.cuda.is_available()
    args.update(model_name_or_path=spec["model"], dataset_dir=data_dir, dataset="viggo-train",
                output_dir=spec["output_dir"], overwrite_output_dir=True, save_strategy="no", report_to="none",
                plot_loss=False, do_eval=False)
    args.setdefault("seed", 42)
    args.setdefault("bf16", cuda)
    if not cuda:
        args["bf16"] = False
    if spec.get("max_samples"):  # dry run
        args["max_samples"] = spec["max_samples"]
    from llamafactory.train.tuner import run_exp

    t0 = time.monotonic()
    run_exp(args=args)
    train_s = time.monotonic() - t0
    state = json.loads((Path(spec["output_dir"]) / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]

    from e2e_llm.config import load_yaml_model
    from e2e_llm.evaluate import evaluate
    from e2e_llm.task import TaskSchema

    task = load_yaml_model(TaskSchema, TASK)
    rows = [json.loads(x) for x in Path(spec["data"], "val.jsonl").read_text().splitlines() if x.strip()]
    rows = _with_system(rows[:spec["eval_rows"]], eval_system)
    t1 = time.monotonic()
    preds = generate(spec["model"], spec["output_dir"], rows, task.default_instruction(), spec["max_new_tokens"],
                     spec["eval_batch"])
    metrics = evaluate(task, preds, [r["output"] for r in rows], [r["input"] for r in rows])
    result = {
        "name": spec["name"], "overrides": spec["overrides"], "cost": spec["cost"], "token_cost": token_cost,
        "steps": state["global_step"],
        "train_s": train_s, "eval_s": time.monotonic() - t1, "final_loss": losses[-1] if losses else None,
        "args": {k: args[k] for k in sorted(args) if k not in ("model_name_or_path", "dataset_dir", "output_dir")},
        **{m: metrics[m] for m in METRICS}, "n_eval": metrics["n"],
        "samples": [{"input": r["input"], "prediction": p, "reference": r["output"]} for r, p in zip(rows[:3], preds)],
    }
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    return 0


# ---------------------------------------------------------------------------------------
# the grid (GPU machine)


def run(ns: argparse.Namespace) -> int:
    start = time.monotonic()
    out = Path(ns.out or os.environ.get("OUT") or "/tmp/e2e-sweep-out")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    env = _device.install_wheels() if ns.install else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_device.SITE), str(ROOT / "src"), env.get("PYTHONPATH", ""))
                                        if p)
    env.update(DISABLE_VERSION_CHECK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(ns.threads))
    if ns.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    _device.use_project_src()
    from e2e_llm.compat.llamafactory import read_recipe_file

    recipe = read_recipe_file(RECIPE)
    unknown = set(ns.only or ()) - set(GRID)
    if unknown:
        raise SystemExit(f"unknown point(s) {sorted(unknown)}; have {list(GRID)}")
    if not 1 <= ns.round <= len(ROUNDS):
        raise SystemExit(f"--round {ns.round}: rounds are 1..{len(ROUNDS)}")
    names = [n for n in GRID if n in ns.only] if ns.only else list(ROUNDS[ns.round - 1])
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    results: dict[str, dict] = {}
    me = [sys.executable, str(Path(__file__).resolve())]
    while pending or running:
        while pending and len(running) < ns.workers and time.monotonic() - start < ns.budget_s:
            name = pending.pop(0)
            spec = {"name": name, "overrides": GRID[name], "cost": cost(recipe, GRID[name]), "model": ns.model,
                    "data": ns.data, "output_dir": str(work / "out" / name), "result": str(work / f"{name}.json"),
                    "eval_rows": 4 if ns.dry_run else ns.eval_rows, "max_new_tokens": 8 if ns.dry_run else 96,
                    "eval_batch": ns.eval_batch, "max_samples": 8 if ns.dry_run else None}
            spec_file = work / f"{name}.spec.json"
            spec_file.write_text(json.dumps(spec))
            Path(spec["result"]).unlink(missing_ok=True)
            log = work / f"{name}.log"
            # one datasets cache per point: concurrent points writing one cache collide
            point_env = dict(env, HF_HOME=str(work / "hf" / name))
            with log.open("w") as fh:
                proc = subprocess.Popen([*me, "_point", str(spec_file)], env=point_env, cwd=ROOT, stdout=fh,
                                        stderr=subprocess.STDOUT)
            running[name] = (proc, time.monotonic(), log)
        if not running:
            for name in pending:
                results[name] = {"name": name, "error": "skipped: out of budget"}
            break
        time.sleep(1)
        for name, (proc, t, log) in list(running.items()):
            late = time.monotonic() - start > ns.budget_s + ns.grace_s
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            del running[name]
            res = work / f"{name}.json"
            if proc.returncode == 0 and res.is_file():
                results[name] = json.loads(res.read_text())
            else:
                results[name] = {"name": name, "error": f"rc={proc.returncode}: {_device.log_tail(log, 8)}"}
            r = results[name]
            shown = (f"exact {r['exact_match']:.3f} F1 {r['slot_f1']:.3f}" if "exact_match" in r
                     else r["error"][-400:])
            print(f"{name}: {shown} ({time.monotonic() - t:.0f} s)", flush=True)
    report = {"machine": _device.gpu_name(), "date": _device.today(), "dry_run": ns.dry_run,
              "recipe": str(RECIPE.relative_to(ROOT)), "eval_rows": 4 if ns.dry_run else ns.eval_rows,
              "workers": ns.workers,
              "points": [results[n] for n in names if n in results], "wall_s": time.monotonic() - start}
    (out / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "sweep.md").write_text(table(report) + "\n")
    print(table(report))
    return 0


def table(report: dict) -> str:
    rows = [f"{report['machine']}, {report['date']}, {report['recipe']}, first {report['eval_rows']} val rows, "
            f"greedy HF generate (no grammar), {report['workers']} points at a time",
            "",
            "| point | overrides | rows x epochs (cost) | steps | exact | slot F1 | func acc | valid MR | loss | "
            "train s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["points"]:
        if "exact_match" not in r:
            rows.append(f"| {r['name']} | error: {r['error'][-200:].replace(chr(10), ' ')} | | | | | | | | |")
            continue
        a = r["args"]
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(recipe)"
        cost_s = f"{r['cost']:.2f}" + (f"; tokens {r['token_cost']:.2f}" if "token_cost" in r else "")
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"
        rows.append(f"| {r['name']} | {over} | {a['max_samples']} x {a['num_train_epochs']:g} ({cost_s}) | "
                    f"{r['steps']} | {r['exact_match']:.3f} | {r['slot_f1']:.3f} | {r['function_accuracy']:.3f} | "
                    f"{r['valid_mr_rate']:.3f} | {loss} | {r['train_s']:.0f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="train and score every grid point (GPU machine)")
    p.add_argument("--out", help="output folder (default $OUT)")
    p.add_argument("--work", default="/tmp/e2e-sweep")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(_device.DATA_DIR), help="train.jsonl, val.jsonl, dataset_info.json")
    p.add_argument("--only", nargs="*", help="point names (default: the whole grid)")
    p.add_argument("--workers", type=int, default=6, help="points at a time")
    p.add_argument("--threads", type=int, default=2, help="OMP threads per point")
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--eval-batch", type=int, default=100)
    p.add_argument("--budget-s", type=float, default=500, help="start no point after this many seconds")
    p.add_argument("--grace-s", type=float, default=240, help="kill what still runs this long after the budget")
    p.add_argument("--round", type=int, default=1,
                   help="which round's points (1 the first grid, 2 its best settings, 3 the short system prompt, "
                        "4 fewer steps and top layers, 5 row counts and seeds)")
    p.add_argument("--install", action="store_true", help="install .device/wheels first (train_throughput's)")
    p.add_argument("--dry-run", action="store_true", help="CPU: 8 rows, 4 val rows, 8 new tokens")
    p = sub.add_parser("table", help="print the markdown table of a sweep.json")
    p.add_argument("report")
    p = sub.add_parser("_point")
    p.add_argument("spec")
    ns = parser.parse_args(argv)
    if ns.cmd == "run":
        return run(ns)
    if ns.cmd == "table":
        print(table(json.loads(Path(ns.report).read_text())))
        return 0
    return run_point(Path(ns.spec))


if __name__ == "__main__":
    sys.exit(main())
