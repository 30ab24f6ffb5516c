# SPDX-License-Identifier: Apache-2.0
"""The ``ray.data.llm`` pipeline: sampling and engine settings, the environment remote nodes
need, the processor (preprocess -> chat template -> vLLM -> finalize) and a local Ray."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

from e2e_llm import storage
from e2e_llm.adapters import vllm_max_lora_rank
from e2e_llm.batch.adapter import Adapter
from e2e_llm.batch.inputs import BatchError
from e2e_llm.batch.upload import LoraSource
from e2e_llm.config import PipelineConfig
from e2e_llm.data import chat_messages
from e2e_llm.host_cpus import usable_cpus
from e2e_llm.node_temp import ray_temp_dir_problem
from e2e_llm.ray_address import RAY_ADDRESS_ENV, own_instance_runtime_env, unreachable_ray_address
from e2e_llm.serve import CPU_ENGINE_ENV, cpu_engine_kwargs


def sampling_params(config: PipelineConfig, task, structured: bool | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": config.batch.temperature, "max_tokens": config.batch.max_tokens}
    if config.batch.structured_output if structured is None else structured:
        # vLLM >= 0.11: SamplingParams(structured_outputs=StructuredOutputsParams(regex=...));
        # ray.data.llm builds that object from this dict.
        params["structured_outputs"] = {"regex": task.output_regex()}
    return params


def engine_kwargs(config: PipelineConfig, adapter: Adapter | None, mode: str) -> dict[str, Any]:
    from e2e_llm.precision import batch_device, batch_dtype

    kwargs: dict[str, Any] = {
        "max_model_len": config.model.max_model_len,
        "dtype": batch_dtype(config).dtype,
        "enable_prefix_caching": config.batch.enable_prefix_caching,
        # vLLM's scheduler default depends on how the engine is built (LLM class on CPU: 256;
        # the async engine ray.data.llm runs: 128): size it to the rows in flight instead.
        "max_num_seqs": config.batch.batch_size * config.batch.max_concurrent_batches,
    }
    if adapter is not None and mode == "lora":
        kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(adapter.rank), max_loras=1)
    if batch_device(config) == "cpu":
        kwargs.update(cpu_engine_kwargs())
    kwargs.update(config.batch.engine_kwargs)
    return kwargs


def engine_env(config: PipelineConfig, model_source: str, lora_path: str | None = None) -> dict[str, str]:
    """Environment variables the nodes need to read a remote ``model_source`` or LoRA
    ``dynamic_lora_loading_path`` (the same downloader, see :func:`lora_source`).

    Ray 2.60's ray.data.llm takes an object-store URI as ``model_source`` and fetches it itself:
    every stage that needs the model calls ``download_model_files``
    (ray.llm's common/utils/download_utils.py), which makes a ``CloudMirrorConfig`` of an
    s3:// or gs:// path, downloads it on that node (boto3 for S3, pyarrow for GCS) into the HF hub
    cache (``models--<uri, / as -->/snapshots/<the folder's "hash" file or 0...0>``) and passes
    the local folder on: the engine stage the weights and tokenizer
    (batch/stages/vllm_engine_stage.py, ``vLLMEngineStageUDF.__init__``), the chat-template stage
    (batch/stages/chat_template_stage.py, ``ChatTemplateUDF.__init__``) and
    ``build_vllm_engine_processor`` on the driver (batch/processor/vllm_engine_proc.py) the
    tokenizer and config files only. Credentials come from each node's own environment (IAM role,
    mounted secret); only a non-default S3 endpoint (MinIO, moto) and the region travel here.
    """
    if not any(uri and uri.startswith("s3://") for uri in (model_source, lora_path)):
        return {}
    endpoint = storage.s3_endpoint(config.storage.endpoint_url)
    env = {"AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION") or config.storage.region}
    if endpoint:
        env["AWS_ENDPOINT_URL_S3"] = endpoint
    return env


@contextlib.contextmanager
def _driver_env(env: dict[str, str]):
    """``env`` in this process for the duration (keys already set are kept): build_processor
    reads the tokenizer files of a remote model_source on the driver."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def processor_config(config: PipelineConfig, model_source: str, adapter: Adapter | None, mode: str,
                     lora_path: str | None = None):
    from ray.data.llm import vLLMEngineProcessorConfig

    from e2e_llm.precision import batch_device

    cpu_only = batch_device(config) == "cpu"
    kwargs: dict[str, Any] = dict(
        model_source=model_source,
        engine_kwargs=engine_kwargs(config, adapter, mode),
        batch_size=config.batch.batch_size,
        max_concurrent_batches=config.batch.max_concurrent_batches,
        concurrency=config.batch.concurrency,
        should_continue_on_error=True,
        log_engine_metrics=False,
        # vLLM tokenizes and detokenizes itself; separate stages only add actors on a small box.
        tokenize_stage=False,
        detokenize_stage=False,
    )
    if lora_path:
        kwargs["dynamic_lora_loading_path"] = lora_path
    # Every stage's actors (engine, chat template) get it: they download model_source themselves.
    env = engine_env(config, model_source, lora_path)
    if cpu_only:
        # The serving replicas' CPU engine environment (passive OpenMP, normal priority).
        env = {**CPU_ENGINE_ENV, **env}
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    if cpu_only:
        # No accelerator: without a CPU placement group Ray waits forever for {"GPU": 1}.
        kwargs["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        kwargs["chat_template_stage"] = {"enabled": True, "num_cpus": 0.25}
    else:
        # Ray reserves tensor_parallel_size x pipeline_parallel_size GPUs per engine
        # (batch/stages/vllm_engine_stage.py, vLLMEngineStage.post_init).
        kwargs["engine_kwargs"]["tensor_parallel_size"] = config.batch.num_gpus_per_engine
        if config.batch.accelerator_type:
            kwargs["accelerator_type"] = config.batch.accelerator_type
    return vLLMEngineProcessorConfig(**kwargs)


def _preprocess_fn(task, params: dict[str, Any], lora_model: str | None):
    default_instruction = task.default_instruction()

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        out["messages"] = chat_messages(row, default_instruction)
        out["sampling_params"] = params
        if lora_model:
            out["model"] = lora_model
        return out

    return preprocess


def _finalize_fn(input_columns: list[str], max_tokens: int):
    """Every input column plus the generation; error rows (which bypass postprocess) too."""

    def finalize(row: dict[str, Any]) -> dict[str, Any]:
        out = {name: row.get(name) for name in input_columns}
        error = row.get("__inference_error__") or None
        text = row.get("generated_text")
        generated = int(row.get("num_generated_tokens") or 0)
        out.update(
            generated_text=None if error else (text or ""),
            num_input_tokens=int(row.get("num_input_tokens") or 0),
            num_generated_tokens=generated,
            # Stopped by max_tokens, not by the model: the text may be cut off.
            truncated=generated >= max_tokens,
            error=error,
        )
        return out

    return finalize


def engines_start_here(config: PipelineConfig) -> bool:
    """Whether the batch engines start on this machine's CPU (no cluster, no GPUs asked for)."""
    return not os.environ.get(RAY_ADDRESS_ENV) and config.batch.num_gpus_per_engine == 0


def local_engines_problem(config: PipelineConfig) -> str | None:
    """Why the batch engines could not start on this machine now, or None (``make e2e`` asks
    before its first stage)."""
    from e2e_llm.memory import shm_problem

    return shm_problem() if engines_start_here(config) else None


def start_ray(config: PipelineConfig, temp_dir: str | None = None) -> None:
    """Connect to the cluster (RAY_ADDRESS) or, on a CPU profile, start a private local Ray
    with its own temp dir (several users may share the machine)."""
    import ray

    if ray.is_initialized():
        return
    if problem := unreachable_ray_address():
        raise BatchError(problem)
    if not engines_start_here(config):
        ray.init()
        return
    if problem := local_engines_problem(config):
        raise BatchError(problem)
    temp_dir = temp_dir or os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    if problem := ray_temp_dir_problem(temp_dir):
        raise BatchError(f"$RAY_TMPDIR: {problem}")
    ray.init(num_cpus=usable_cpus(), _temp_dir=temp_dir, include_dashboard=False,
             runtime_env=own_instance_runtime_env(), log_to_driver=os.environ.get("E2E_LLM_RAY_LOGS", "0") == "1")


def num_blocks(rows: int, batch_size: int) -> int:
    """One dataset block per engine batch. Left to Ray Data, ``from_items`` makes one block per
    row (up to 200) and the preprocess map then runs one task per row, one at a time on a 2-core
    machine (its resource budget): 84 s of the 150 s a 200-row run took, before the engine saw
    its first row. The engine still gets every batch of a block at once (an async UDF runs up to
    ``max_concurrent_batches`` batches of a task concurrently), and several engines
    (``batch.concurrency``) still get blocks to share."""
    return max(1, -(-rows // batch_size))


def generate(config: PipelineConfig, rows: list[dict[str, Any]], *, model_source: str, task,
             adapter: Adapter | None = None, mode: str = "merged", structured: bool | None = None,
             tokenizer_source: str | None = None, lora: LoraSource | None = None) -> list[dict[str, Any]]:
    """Run ``rows`` (all with an ``input``) through ray.data.llm; one output row per input
    row, in input order (by ``_line``). LoRA mode names ``lora`` in each row (default: the
    adapter's local folder)."""
    import ray
    from ray.data.llm import build_processor

    start_ray(config)
    input_columns = sorted(set().union(*(r.keys() for r in rows)))
    if adapter is not None and mode == "lora" and lora is None:
        lora = LoraSource(name=str(adapter.path), source=str(adapter.path))
    lora_model = lora.name if adapter is not None and mode == "lora" else None
    lora_path = lora.loading_path if lora_model else None
    with _driver_env(engine_env(config, model_source, lora_path)):
        processor = build_processor(
            processor_config(config, model_source, adapter, mode, lora_path),
            preprocess=_preprocess_fn(task, sampling_params(config, task, structured), lora_model),
            preprocess_map_kwargs={"num_cpus": 0.25},
            postprocess_map_kwargs={"num_cpus": 0.25},
        )
    # Nested values (lists, dicts) would force Arrow schemas onto columns we only carry.
    ds = ray.data.from_items([{k: r.get(k) for k in input_columns} for r in rows],
                             override_num_blocks=num_blocks(len(rows), config.batch.batch_size))
    ds = processor(ds).map(_finalize_fn(input_columns, config.batch.max_tokens), num_cpus=0.25)
    out = ds.take_all()
    out.sort(key=lambda r: r["_line"])
    if len(out) != len(rows):
        raise BatchError(f"pipeline returned {len(out)} rows for {len(rows)} inputs")
    return out
