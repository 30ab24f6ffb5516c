# SPDX-License-Identifier: Apache-2.0
"""Batch inference benchmarks: the ray.data.llm pipeline and the engine settings behind it.

Two sub-benchmarks, each one process, same model and prompts within a run:

``pipeline``  batch_pipeline_vs_vllm: rows/s of our ray.data.llm pipeline
              (e2e_llm.batch.generate: preprocess -> chat template -> vLLM -> finalize) vs
              raw ``vllm.LLM.generate`` on the same chat prompts (train inputs), both timed
              end to end including engine start-up, plus raw generate-only rows/s.
``engines``   with plain vllm.LLM, after a warm-up per engine, generate-only rows/s:
              batch_merged_vs_lora (merged checkpoint vs base + LoRA adapter),
              batch_structured_vs_unstructured (regex-constrained vs free decoding, merged),
              batch_prefix_caching (enable_prefix_caching on vs off, merged).
``lora-ops``  with plain vllm.LLM, after a warm-up per engine, generate-only rows/s of base +
              LoRA adapter with the CPU LoRA ops of e2e_llm.cpu_lora_ops (this package's vLLM
              plugin) vs vLLM's own (the plugin left out through VLLM_PLUGINS): cpu_lora_ops; and
              batch_merged_vs_lora with ours. Each LoRA engine also answers two base-model
              prompts batched with two adapter ones, to show whether an adapter leaked into them.

Each figure prints a table row and appends one JSON line to bench/results.jsonl:
{"bench", "metric", "value", "baseline", "ratio", "machine", "date", ...details}.

Usage (the CPU is shared: always under the heavy-job lock):
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/batch.py pipeline --rows 800
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/batch.py engines --rows 100
    flock /tmp/e2e-heavy.lock .venv/serve/bin/python bench/batch.py lora-ops --rows 100
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from e2e_llm.precision import batch_dtype, cpu_signals

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in (("OMP_WAIT_POLICY", "PASSIVE"), ("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "2")):
    os.environ.setdefault(_k, _v)
MACHINE = f"{os.cpu_count()}-core CPU"


def record(results: Path, bench: str, metric: str, value: float, baseline: float, **details) -> dict:
    line = {"bench": bench, "metric": metric, "value": round(value, 4), "baseline": round(baseline, 4),
            "ratio": round(value / baseline, 4) if baseline else None, "machine": MACHINE,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), **details}
    with open(results, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    return line


def table(lines: list[dict]) -> str:
    out = [f"{'bench':<34} {'metric':<44} {'value':>9} {'baseline':>9} {'ratio':>7}"]
    for r in lines:
        out.append(f"{r['bench']:<34} {r['metric'][:44]:<44} {r['value']:>9.3f} {r['baseline']:>9.3f} "
                   f"{r['ratio'] if r['ratio'] is not None else '-':>7}")
    return "\n".join(out)


def load(args):
    """Config, task, base model path, resolved adapter (or None), rows."""
    from e2e_llm.batch import resolve_adapter
    from e2e_llm.config import load_profile
    from e2e_llm.data import read_jsonl
    from e2e_llm.model import resolve_model_path

    config = load_profile(args.profile, root=ROOT)
    config.batch.max_tokens = args.max_tokens
    if args.dtype:
        config.batch.dtype = args.dtype
    task = config.task_schema()
    model_path = resolve_model_path(config.model, root=config.root)
    adapter = resolve_adapter(config, args.adapter, model_path)
    rows = read_jsonl(config.storage_uri("data", config.data.dataset, f"{args.split}.jsonl"))
    if len(rows) < args.rows:
        raise SystemExit(f"{args.split} has {len(rows)} rows, fewer than --rows {args.rows}")
    rows = [dict(r, _line=i + 1) for i, r in enumerate(rows[: args.rows])]
    return config, task, model_path, adapter, rows


def chat_prompts(model_dir: str, rows: list[dict], task) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.apply_chat_template(
        [{"role": "system", "content": r.get("instruction") or task.default_instruction()},
         {"role": "user", "content": r["input"]}], add_generation_prompt=True, tokenize=False) for r in rows]


def vllm_params(config, task, structured: bool):
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    so = StructuredOutputsParams(regex=task.output_regex()) if structured else None
    return SamplingParams(temperature=0.0, max_tokens=config.batch.max_tokens, structured_outputs=so)


def make_llm(config, model: str, adapter=None, **extra):
    """A vllm.LLM with the batch stage's engine settings: merged (a plain checkpoint), or the base
    model serving ``adapter`` as LoRA."""
    from vllm import LLM

    from e2e_llm.batch import engine_kwargs

    kwargs = engine_kwargs(config, adapter, "lora" if adapter else "merged") | extra
    return LLM(model=model, seed=0, **kwargs)


def free(llm) -> None:
    del llm
    gc.collect()


def bench_pipeline(args) -> list[dict]:
    from e2e_llm.batch import generate, merged_model_dir, start_ray

    config, task, model_path, adapter, rows = load(args)
    model = str(merged_model_dir(config, adapter, model_path)) if adapter else model_path
    structured = not args.no_structured
    prompts = chat_prompts(model, rows, task)

    t0 = time.perf_counter()
    llm = make_llm(config, model)
    t1 = time.perf_counter()
    raw = llm.generate(prompts, vllm_params(config, task, structured), use_tqdm=False)
    t2 = time.perf_counter()
    raw_texts = [o.outputs[0].text for o in raw]
    gen_tokens = sum(len(o.outputs[0].token_ids) for o in raw)
    free(llm)
    raw_total, raw_gen = t2 - t0, t2 - t1

    start_ray(config, tempfile.mkdtemp(prefix="rbb-", dir="/tmp"))
    t3 = time.perf_counter()
    out = generate(config, rows, model_source=model, task=task, structured=structured)
    pipe_total = time.perf_counter() - t3
    import ray

    ray.shutdown()
    same = sum(a == (b["generated_text"] or "") for a, b in zip(raw_texts, out))
    errors = sum(1 for r in out if r["error"])
    n = len(rows)
    details = dict(rows=n, model="merged adapter" if adapter else "base", structured=structured,
                   dtype=batch_dtype(config).dtype,
                   identical_outputs=same, pipeline_errors=errors, generated_tokens=gen_tokens,
                   raw_engine_start_s=round(t1 - t0, 1), raw_generate_s=round(raw_gen, 1),
                   pipeline_s=round(pipe_total, 1), shared_cpu=True)
    return [
        record(args.results, "batch_pipeline_vs_vllm", f"rows/s end-to-end incl. engine start ({n} rows)",
               n / pipe_total, n / raw_total, **details),
        record(args.results, "batch_pipeline_vs_vllm", f"rows/s pipeline vs raw generate only ({n} rows)",
               n / pipe_total, n / raw_gen, **details),
    ]


def timed_generate(llm, prompts, params, lora_request=None, warmup: int = 8):
    llm.generate(prompts[:warmup], params, lora_request=lora_request, use_tqdm=False)
    t0 = time.perf_counter()
    out = llm.generate(prompts, params, lora_request=lora_request, use_tqdm=False)
    seconds = time.perf_counter() - t0
    return [o.outputs[0].text for o in out], seconds, sum(len(o.outputs[0].token_ids) for o in out)


def bench_engines(args) -> list[dict]:
    from vllm.lora.request import LoRARequest

    from e2e_llm.batch import merged_model_dir

    config, task, model_path, adapter, rows = load(args)
    if adapter is None:
        raise SystemExit("the engines benchmark needs an adapter (--adapter latest|<path>)")
    merged = str(merged_model_dir(config, adapter, model_path))
    prompts = chat_prompts(model_path, rows, task)
    n = len(rows)
    structured_p, free_p = vllm_params(config, task, True), vllm_params(config, task, False)

    llm = make_llm(config, merged, enable_prefix_caching=True)
    merged_texts, merged_s, merged_tok = timed_generate(llm, prompts, structured_p)
    free_texts, free_s, free_tok = timed_generate(llm, prompts, free_p)
    free(llm)
    llm = make_llm(config, merged, enable_prefix_caching=False)
    nocache_texts, nocache_s, nocache_tok = timed_generate(llm, prompts, structured_p)
    free(llm)
    llm = make_llm(config, model_path, adapter, enable_prefix_caching=True)
    lora_texts, lora_s, lora_tok = timed_generate(llm, prompts, structured_p,
                                                  LoRARequest("adapter", 1, str(adapter.path)))
    free(llm)

    def valid(texts: list[str]) -> float:
        return round(sum(task.try_parse(t) is not None for t in texts) / len(texts), 4)

    dtype = batch_dtype(config).dtype
    common = dict(rows=n, dtype=dtype, warmup_rows=8, timed="generate only, after warm-up", shared_cpu=True)
    tps = lambda tokens, seconds: round(tokens / seconds, 1)  # noqa: E731
    return [
        record(args.results, "batch_merged_vs_lora", f"rows/s merged vs LoRA, structured, {dtype} ({n} rows)",
               n / merged_s, n / lora_s, merged_tokens_per_s=tps(merged_tok, merged_s),
               lora_tokens_per_s=tps(lora_tok, lora_s), identical_outputs=sum(a == b for a, b in
                                                                                zip(merged_texts, lora_texts)),
               **common),
        record(args.results, "batch_structured_vs_unstructured",
               f"rows/s structured vs free, merged, {dtype} ({n} rows)", n / merged_s, n / free_s,
               valid_structured=valid(merged_texts), valid_unstructured=valid(free_texts),
               tokens_per_s_structured=tps(merged_tok, merged_s), tokens_per_s_unstructured=tps(free_tok, free_s),
               **common),
        record(args.results, "batch_prefix_caching", f"rows/s prefix cache on vs off, merged, {dtype} ({n} rows)",
               n / merged_s, n / nocache_s, tokens_per_s_on=tps(merged_tok, merged_s),
               tokens_per_s_off=tps(nocache_tok, nocache_s),
               identical_outputs=sum(a == b for a, b in zip(merged_texts, nocache_texts)), **common),
    ]


def vllm_plugins_without_ours() -> str:
    """A VLLM_PLUGINS value that loads every general plugin installed but this package's."""
    from importlib.metadata import entry_points

    from e2e_llm.compat.vllm import PLUGIN_NAME

    return ",".join(p.name for p in entry_points(group="vllm.general_plugins") if p.name != PLUGIN_NAME)


def base_answers_leak(llm, params, lora_request) -> bool:
    """Whether base-model prompts answer differently when batched with adapter prompts."""
    prompts = ["The capital of France is", "List three colours:"]
    alone = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    mixed = llm.generate(prompts * 2, params, lora_request=[None, None, lora_request, lora_request], use_tqdm=False)
    return [o.outputs[0].text for o in mixed[:2]] != alone


def bench_lora_ops(args) -> list[dict]:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from e2e_llm.batch import merged_model_dir

    config, task, model_path, adapter, rows = load(args)
    if adapter is None:
        raise SystemExit("the lora-ops benchmark needs an adapter (--adapter latest|<path>)")
    prompts, n = chat_prompts(model_path, rows, task), len(rows)
    structured_p, short_p = vllm_params(config, task, True), SamplingParams(temperature=0.0, max_tokens=12)
    request = LoRARequest("adapter", 1, str(adapter.path))
    llm = make_llm(config, str(merged_model_dir(config, adapter, model_path)))
    merged_texts, merged_s, merged_tok = timed_generate(llm, prompts, structured_p)
    free(llm)
    runs = {}
    for ops, plugins in (("vllm", vllm_plugins_without_ours()), ("e2e_llm", None)):
        os.environ.pop("VLLM_PLUGINS", None)
        if plugins is not None:
            os.environ["VLLM_PLUGINS"] = plugins  # read by the engine processes vLLM starts next
        llm = make_llm(config, model_path, adapter)
        texts, seconds, tokens = timed_generate(llm, prompts, structured_p, request)
        runs[ops] = dict(texts=texts, seconds=seconds, tokens=tokens, leak=base_answers_leak(llm, short_p, request))
        free(llm)
    os.environ.pop("VLLM_PLUGINS", None)

    dtype = batch_dtype(config).dtype
    common = dict(rows=n, dtype=dtype, warmup_rows=8, timed="generate only, after warm-up", shared_cpu=True,
                  cpu_capability=cpu_signals().capability)
    ours, theirs = runs["e2e_llm"], runs["vllm"]
    tps = lambda run: round(run["tokens"] / run["seconds"], 1)  # noqa: E731
    return [
        record(args.results, "cpu_lora_ops", f"LoRA rows/s, e2e-llm CPU ops vs vLLM's, structured, {dtype} ({n} rows)",
               n / ours["seconds"], n / theirs["seconds"], tokens_per_s=tps(ours), vllm_tokens_per_s=tps(theirs),
               identical_outputs=sum(a == b for a, b in zip(ours["texts"], theirs["texts"])),
               base_answers_leak=ours["leak"], vllm_base_answers_leak=theirs["leak"], **common),
        record(args.results, "batch_merged_vs_lora",
               f"rows/s merged vs LoRA (e2e-llm CPU ops), structured, {dtype} ({n} rows)",
               n / merged_s, n / ours["seconds"], merged_tokens_per_s=round(merged_tok / merged_s, 1),
               lora_tokens_per_s=tps(ours), identical_outputs=sum(a == b for a, b in zip(merged_texts, ours["texts"])),
               **common),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", choices=("pipeline", "engines", "lora-ops"))
    parser.add_argument("--profile", default="local")
    parser.add_argument("--adapter", default="latest", help="run id, path, latest or none")
    parser.add_argument("--split", default="train", help="rows come from this split (train has 5k+)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--no-structured", action="store_true", help="pipeline bench without the regex")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="engine dtype (default: batch.dtype)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results.jsonl")
    args = parser.parse_args()
    lines = {"pipeline": bench_pipeline, "engines": bench_engines, "lora-ops": bench_lora_ops}[args.which](args)
    print(table(lines))
    for line in lines:
        print(json.dumps(line))


if __name__ == "__main__":
    main()
