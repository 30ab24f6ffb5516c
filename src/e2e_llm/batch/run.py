# SPDX-License-Identifier: Apache-2.0
"""A whole batch run: inputs, adapter, generation, predictions, metrics, report, manifest."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from e2e_llm import storage
from e2e_llm.batch.adapter import instruction_mismatch, resolve_adapter
from e2e_llm.batch.inputs import BatchError, load_rows, resolve_split
from e2e_llm.batch.manifest import (
    BATCH_KIND,
    MANIFEST_FILE,
    PREDICTIONS_FILE,
    BatchResult,
    library_versions,
    previous_batch_metrics,
)
from e2e_llm.batch.merge import merged_model_source
from e2e_llm.batch.pipeline import engine_kwargs, generate, sampling_params
from e2e_llm.batch.upload import lora_source
from e2e_llm.config import PipelineConfig
from e2e_llm.runs import new_run_id


def run_batch(
    config: PipelineConfig,
    *,
    split: str | None = None,
    adapter_ref: str | None = None,
    mode: str | None = None,
    structured: bool | None = None,
    limit: int | None = None,
    run_id: str | None = None,
    out_uri: str | None = None,
    any_instruction: bool = False,
) -> BatchResult:
    """Resolve inputs, generate with ray.data.llm, write predictions, metrics, report, manifest.
    Rows asking the adapter with another instruction than it was trained with are refused
    (:func:`~e2e_llm.batch.adapter.instruction_mismatch`) unless ``any_instruction``."""
    from e2e_llm.evaluate import HEADLINE, EvaluationError, Unlabelled, evaluate_rows, write_reports
    from e2e_llm.model import prepared_dtype, resolve_model_path
    from e2e_llm.precision import batch_dtype

    started = time.time()
    dtype = batch_dtype(config)
    print(f"[batch] dtype: {dtype.line()}", flush=True)
    split = split or config.batch.split
    mode = mode or config.batch.adapter_mode
    structured = config.batch.structured_output if structured is None else structured
    limit = limit or config.batch.limit
    task = config.task_schema()
    split_uri = resolve_split(config, split)
    model_path = resolve_model_path(config.model, root=config.root)
    adapter = resolve_adapter(config, adapter_ref, model_path)
    data = load_rows(config, split_uri, limit)
    valid = [r for r in data.rows if r["_line"] not in data.invalid]
    mismatch = instruction_mismatch(adapter, valid, task.default_instruction(), split_uri)
    if mismatch and not any_instruction:
        raise BatchError(f"{mismatch}; or pass --any-instruction to score it anyway")
    if mismatch:
        print(f"[batch] warning: {mismatch}", flush=True)

    model_source, merged = model_path, None
    if adapter is not None and mode == "merged":
        merged = merged_model_source(config, adapter, model_path)
        model_source = merged.source
        if merged.source != str(merged.local_dir):
            state = f"uploaded from {merged.local_dir}" if merged.uploaded else "already in storage, not uploaded"
            print(f"[batch] merged model: {merged.source} ({state})", flush=True)
    lora = lora_source(config, adapter) if adapter is not None and mode == "lora" else None
    if lora is not None and lora.loading_path:
        state = f"uploaded from {adapter.path}" if lora.uploaded else "already in storage, not uploaded"
        print(f"[batch] LoRA adapter: {lora.source} ({state})", flush=True)
    name = Path(split_uri).stem if split not in config.data.splits else split
    run_id = run_id or f"{new_run_id()}-{name}-{adapter.sha256[:8] if adapter else 'base'}-{mode}"
    out_uri = out_uri or config.storage_uri("batch", run_id)

    engine_rows = valid
    gen_started = time.time()
    generated = (generate(config, engine_rows, model_source=model_source, task=task, adapter=adapter, mode=mode,
                          structured=structured, lora=lora) if engine_rows else [])
    gen_seconds = time.time() - gen_started
    by_line = {r["_line"]: r for r in generated}
    rows = []
    for row in data.rows:
        line = row["_line"]
        if line in data.invalid:
            out = {k: v for k, v in row.items()}
            out.update(generated_text=None, num_input_tokens=0, num_generated_tokens=0, truncated=False,
                       error=data.invalid[line])
        else:
            out = by_line[line]
        rows.append(out)
    assert len(rows) == len(data.rows)
    storage.write_text(storage.join(out_uri, PREDICTIONS_FILE),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), **config.storage_kw())

    metrics = None
    previous = previous_batch_metrics(config, split_uri, exclude=run_id)
    context = {
        "run": run_id, "data": f"{split_uri} ({len(rows)} rows)", "model": f"{config.model.id} ({model_path})",
        "adapter": f"{adapter.path} (sha256 {adapter.sha256[:12]}, mode {mode})" if adapter else "none (base model)",
        "structured output": structured, "max_tokens": config.batch.max_tokens,
    }
    if previous:
        context["compared with"] = previous[0]
    try:
        metrics = evaluate_rows(task, rows, source=split_uri)
    except Unlabelled:
        pass  # predictions only
    except EvaluationError as exc:
        raise BatchError(str(exc)) from None
    if metrics:
        write_reports(metrics, out_uri, title=f"Batch evaluation: {name}", context=context,
                      previous=previous[1] if previous else None, storage_kw=config.storage_kw())
    errors = sum(1 for r in rows if r["error"])
    manifest = {
        "kind": BATCH_KIND,
        "run_id": run_id,
        "profile": config.profile,
        "started_at": datetime.fromtimestamp(started, UTC).isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "base_model": {"id": config.model.id, "source": config.model.source, "path": model_path,
                       "dtype": prepared_dtype(Path(model_path)) if Path(model_path).is_dir() else None},
        "adapter": None if adapter is None else {
            "path": str(adapter.path), "sha256": adapter.sha256, "rank": adapter.rank, "mode": mode,
            "base_model_name_or_path": adapter.base_model, "engine_model": model_source,
            "merged": None if merged is None else {"source": merged.source, "uploaded": merged.uploaded,
                                                   "local_dir": str(merged.local_dir) if merged.local_dir else None},
            # Where the engine loaded the LoRA from: the local folder, or <loading_path>/<name>.
            "lora": None if lora is None else {"name": lora.name, "source": lora.source,
                                               "dynamic_lora_loading_path": lora.loading_path,
                                               "uploaded": lora.uploaded},
            "training_run": (adapter.manifest or {}).get("run_id"),
        },
        "data": {"split": split, "uri": split_uri, "sha256": data.sha256},
        "instruction_mismatch": mismatch,  # scored anyway (--any-instruction): why the scores are not its own
        # What the metrics were scored by (`e2e-llm evaluate` on these predictions checks it).
        "task": {"name": task.name, "schema": config.data.task},
        # The regex by its hash: it decides the output, so an earlier run with another grammar is
        # not the same sampling (e2e_llm.e2e reuses a base-model run only on equal sampling).
        "sampling": sampling_params(config, task, structured) | ({"structured_outputs": _regex_id(task)}
                                                                 if structured else {}),
        "engine": engine_kwargs(config, adapter, mode),
        "dtype": dtype.as_dict(),  # the engine's dtype and why (CPU capability / GPU)
        "rows": {"in": len(data.rows), "out": len(rows), "errors": errors, "invalid_input": len(data.invalid),
                 "engine_errors": errors - len(data.invalid), "truncated": sum(1 for r in rows if r["truncated"])},
        "timing": {"seconds": round(time.time() - started, 1), "generate_seconds": round(gen_seconds, 1),
                   "rows_per_s": round(len(engine_rows) / gen_seconds, 3) if engine_rows and gen_seconds else None},
        "outputs": {"predictions": storage.join(out_uri, PREDICTIONS_FILE)},
        "metrics": {k: metrics[k] for k in (*HEADLINE, "n", "n_errors", "n_unscored")} if metrics else None,
        "previous_run": previous[0] if previous else None,
        "versions": library_versions(),
    }
    storage.write_text(storage.join(out_uri, MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n",
                       **config.storage_kw())
    return BatchResult(run_id=run_id, out_uri=out_uri, manifest=manifest, metrics=metrics, rows=rows,
                       previous=previous[1] if previous else None)


def _regex_id(task) -> str:
    return "task regex sha256:" + hashlib.sha256(task.output_regex().encode()).hexdigest()[:16]
