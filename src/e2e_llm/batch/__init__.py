# SPDX-License-Identifier: Apache-2.0
"""Batch inference with ``ray.data.llm`` (vLLM) and evaluation of the results.

One run reads a split (or any JSONL file) from the profile's storage, turns every row into a
chat (system = ``instruction``, user = ``input``), generates with vLLM through
``vLLMEngineProcessorConfig`` + ``build_processor`` and writes, under
``<storage>/batch/<run id>/``: ``predictions.jsonl`` (every input column plus
``generated_text``, token counts and ``error``), ``metrics.json``, ``report.md``,
``metrics.png`` and ``manifest.json``.

Nothing is lost: rows in = rows out. A row without a usable ``input`` never reaches the
engine and comes out with ``error`` set; a row the engine fails on (a prompt longer than
``max_model_len``, ...) comes out with the engine's error. Error rows count as wrong in the
metrics and are counted in ``n_errors``; a line that is not JSON has no reference to score and is
counted in ``n_unscored`` (``e2e_llm.evaluate.evaluate_rows``).

An adapter is applied in one of two ways (``batch.adapter_mode``):

- ``merged`` (default): peft ``merge_and_unload`` in fp32 once, saved in the engine dtype in a
  cache keyed by the adapter's sha256; vLLM then runs a plain model (no LoRA kernels, ~5x
  faster on CPU). On remote storage the merged folder is uploaded once to
  ``<storage>/merged/<model>-<adapter sha>-<dtype>/`` and the engine reads it from there.
- ``lora``: vLLM LoRA, the adapter named per row in preprocess (``model=<adapter>``), as the
  tutorial does; needed when rows use different adapters on one base. On remote storage the
  adapter is uploaded once to ``<storage>/lora/<model>-lora-<adapter sha>/``, rows name it by that
  folder name and the engine downloads it from ``dynamic_lora_loading_path`` (``<storage>/lora``).

Structured decoding (``batch.structured_output``) constrains generation to the task's
grammar through vLLM structured outputs (the regex from :meth:`TaskSchema.output_regex`).

Modules, one reason to change each: :mod:`~e2e_llm.batch.inputs` (splits and rows),
:mod:`~e2e_llm.batch.adapter` (resolve and check the adapter), :mod:`~e2e_llm.batch.merge`
(merged mode), :mod:`~e2e_llm.batch.upload` (uploads for remote nodes, LoRA mode's source),
:mod:`~e2e_llm.batch.pipeline` (``ray.data.llm``), :mod:`~e2e_llm.batch.manifest` (outputs read
back) and :mod:`~e2e_llm.batch.run` (a whole run). The names below are the package's API.
"""

from e2e_llm.batch.adapter import STORE_PREFIX, Adapter, adapter_sha256, check_adapter, resolve_adapter
from e2e_llm.batch.inputs import BatchError, InputRows, load_rows, resolve_split
from e2e_llm.batch.manifest import MANIFEST_FILE, PREDICTIONS_FILE, BatchResult, previous_batch_metrics
from e2e_llm.batch.merge import MERGED_MARKER, MergedModel, merged_model_dir, merged_model_name, merged_model_source
from e2e_llm.batch.pipeline import engine_env, engine_kwargs, generate, processor_config, sampling_params, start_ray
from e2e_llm.batch.run import run_batch
from e2e_llm.batch.upload import LORA_MARKER, LoraSource, lora_adapter_name, lora_source, upload_once

__all__ = [
    "LORA_MARKER", "MANIFEST_FILE", "MERGED_MARKER", "PREDICTIONS_FILE", "STORE_PREFIX", "Adapter", "BatchError",
    "BatchResult", "InputRows", "LoraSource", "MergedModel", "adapter_sha256", "check_adapter", "engine_env",
    "engine_kwargs", "generate", "load_rows", "lora_adapter_name", "lora_source", "merged_model_dir",
    "merged_model_name", "merged_model_source", "previous_batch_metrics", "processor_config", "resolve_adapter",
    "resolve_split", "run_batch", "sampling_params", "start_ray", "upload_once",
]
