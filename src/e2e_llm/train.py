# SPDX-License-Identifier: Apache-2.0
"""LoRA SFT with LLaMA-Factory, run by Ray Train.

LLaMA-Factory 0.9.5's own ``USE_RAY=1`` path starts plain ``ray.remote`` workers, which
loses Ray Train's checkpoint storage and retries. Here a Ray Train ``TorchTrainer`` forms the
torch process group (gloo on CPU, NCCL on GPU) and each worker runs LLaMA-Factory's
``run_exp`` inside it (``e2e_llm.compat.llamafactory``); a Trainer callback reports every HF checkpoint to Ray Train
with ``ray.train.report``. Ray Train therefore persists checkpoints to the profile's
storage, restarts a failed worker group from the latest one (``FailureConfig``), and a rerun
with the same run id resumes from it. This module plans the run and drives it; what each worker
runs is ``e2e_llm.train_worker``; the manifest it writes, ``e2e_llm.train_report``.

Run layout under ``<storage>/runs/<run_id>/``: Ray Train's ``checkpoint_*`` dirs and state,
``adapter/`` (vLLM-loadable: adapter_config.json + adapter_model.safetensors),
``manifest.json``, ``loss.png``, ``trainer_log.jsonl``, ``tensorboard/``, ``events/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import signal
import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from e2e_llm import storage, train_report, train_rows
from e2e_llm.compat.llamafactory import USE_RAY_ENV
from e2e_llm.config import PipelineConfig
from e2e_llm.host_cpus import cpu_budget, usable_cpus
from e2e_llm.precision import llamafactory_precision
from e2e_llm.ray_address import (
    RAY_ADDRESS_ENV,
    nodes_not_seeing,
    on_every_node,
    own_instance_runtime_env,
    unreachable_ray_address,
)
from e2e_llm.runs import new_run_id
from e2e_llm.serve import RAY_WORKER_NICENESS_ENV
from e2e_llm.train_worker import TRAIN_WORK_DIR, read_events, remove_node_work_dir, train_loop_per_worker

# LLaMA-Factory's own Ray settings: the profile's `train` section replaces them.
RAY_KEYS = ("ray_num_workers", "ray_init_kwargs", "master_addr", "master_port", "ray_run_name",
            "ray_storage_path", "resources_per_worker", "placement_strategy")
# LLaMA-Factory keys `e2e-llm train` sets for each run, and where a user changes them instead.
PROFILE_KEYS = {
    "model_name_or_path": "model.source in the profile",
    "dataset": "data.dataset and train.train_split in the profile",
    "eval_dataset": "data.dataset and train.eval_split in the profile",
    "dataset_dir": "the profile's storage (`e2e-llm data` writes it)",
    "output_dir": "storage.root in the profile (runs/<run id>)",
    "overwrite_output_dir": "the run id: a rerun with the same --run-id resumes, a new one starts fresh",
    "resume_from_checkpoint": "--run-id (the run to resume)",
}


class TrainError(RuntimeError):
    """A training run that cannot start or did not finish; raised before workers start when possible."""


class TrainInterrupted(TrainError):
    """Ctrl-C or SIGTERM: Ray Train aborted the run. Its checkpoints stay for a rerun with the same run id."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


# ---------------------------------------------------------------------------------------
# Recipe handling (driver side, before any worker starts)


def load_recipe(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a native LLaMA-Factory recipe as LLaMA-Factory reads it, apply ``overrides``, and check
    every key and every number or flag against LLaMA-Factory's arguments: a mistake fails here,
    naming where it came from, not in every worker after ``train.max_failures`` restarts."""
    from e2e_llm.compat.llamafactory import read_recipe_file, recipe_field_types

    if not path.is_file():
        raise TrainError(f"{path}: training recipe not found")
    try:
        recipe = read_recipe_file(path) or {}
    except yaml.YAMLError as exc:  # OmegaConf reads with PyYAML, stricter: a duplicate key is an error
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise TrainError(f"{where}: not a readable recipe: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(recipe, dict):
        raise TrainError(f"{path}: a recipe is a mapping of LLaMA-Factory keys")
    fields = recipe_field_types()
    check_recipe_values(recipe, fields, str(path))
    check_recipe_values(overrides or {}, fields, "--set")
    return {**recipe, **(overrides or {})}


def check_recipe_values(values: dict[str, Any], fields: dict[str, Any], where: str) -> None:
    """Each key is LLaMA-Factory's and not a Ray setting; a number or flag has its field's type."""
    for key, value in values.items():
        if key in RAY_KEYS:
            raise TrainError(f"{where}: {key!r} is a Ray setting; set train.num_workers/resources_per_worker "
                             "in the profile instead (Ray Train runs the workers)")
        if key in PROFILE_KEYS and where == "--set":  # a recipe may keep them, to run it alone too
            raise TrainError(f"{where}: {key!r} is set for each run by e2e-llm train; change "
                             f"{PROFILE_KEYS[key]} instead")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TrainError(f"{where}: unknown LLaMA-Factory key {key!r}{hint}")
        expected = _scalar_kinds(fields[key])
        if expected and not any(_is_kind(value, kind) for kind in expected):
            names = " or ".join(kind.__name__ if kind is not type(None) else "null" for kind in expected)
            raise TrainError(f"{where}: {key!r} must be {names}, got {value!r}")


def _scalar_kinds(annotation: Any) -> tuple[type, ...]:
    """(float,), (int, NoneType), ... for a field typed with numbers, flags and None only; () for
    any other type (strings, enums, literals, unions with them: LLaMA-Factory checks those)."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if all(arg in (float, int, bool, type(None)) for arg in args):
        return args
    return ()


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:  # an integer is a fine float (learning_rate: 1); a flag is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs, read as LLaMA-Factory reads them after its recipe on its command line
    (for smoke runs: max_samples=32; learning_rate=2e-4 is a float)."""
    from e2e_llm.compat.llamafactory import read_overrides

    for item in items:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise TrainError(f"override {item!r} is not key=value")
    return read_overrides([item.strip() for item in items])


@dataclasses.dataclass
class TrainPlan:
    """Everything a run needs, resolved and checked on the driver."""

    run_id: str
    run_uri: str
    work_dir: str | None  # None: each node's own (object storage), train_worker.node_work_dir
    dataset_uri: str
    args: dict[str, Any]
    recipe_path: str
    dataset_files: dict[str, str]
    dtype: dict[str, Any] = dataclasses.field(default_factory=dict)  # DtypeChoice.as_dict()
    # Recipe keys whose values this run does not use (PROFILE_KEYS), for a notice.
    replaced_keys: list[str] = dataclasses.field(default_factory=list)
    training_rows: dict[str, Any] = dataclasses.field(default_factory=dict)  # train_rows.check


def plan_run(config: PipelineConfig, run_id: str | None = None, overrides: dict[str, Any] | None = None) -> TrainPlan:
    from e2e_llm.data import ingest_mismatch
    from e2e_llm.model import ModelError, resolve_model_path

    tc = config.train
    if tc.use_gpu and tc.resources_per_worker.get("GPU", 1) <= 0:
        raise TrainError(f"{config.source_file}: train.use_gpu is true but resources_per_worker.GPU is 0")
    if not tc.use_gpu and tc.resources_per_worker.get("GPU", 0) > 0:
        raise TrainError(f"{config.source_file}: resources_per_worker.GPU > 0 needs train.use_gpu: true")
    storage.split_uri(config.storage.root)  # unsupported schemes fail here
    try:
        model_path = resolve_model_path(config.model, root=config.root)
    except ModelError as exc:
        raise TrainError(str(exc)) from None

    recipe_path = config.path(tc.recipe)
    recipe = load_recipe(recipe_path, overrides)
    run_id = run_id or new_run_id()
    dataset_uri = config.storage_uri("data", config.data.dataset)
    info_uri = storage.join(dataset_uri, "dataset_info.json")
    if not storage.exists(info_uri, **config.storage_kw()):
        raise TrainError(f"dataset not found at {dataset_uri}: run `e2e-llm data --profile {config.profile}` first")
    if problem := ingest_mismatch(config):
        raise TrainError(f"{dataset_uri}: {problem}")
    info = json.loads(storage.read_text(info_uri, **config.storage_kw()))
    splits = [tc.train_split] + ([tc.eval_split] if tc.eval_split else [])
    dataset_files = {}
    for split in splits:
        name = f"{config.data.dataset}-{split}"
        if name not in info:
            raise TrainError(f"{info_uri}: split {split!r} missing (have {', '.join(info)})")
        dataset_files[split] = storage.join(dataset_uri, info[name]["file_name"])

    run_uri = config.storage_uri("runs", run_id)
    # The workers' folder (HF output dir, dataset copy): with local storage the run's own folder;
    # with object storage a folder on each node's own disk, resolved on the node.
    work_dir = None if storage.is_remote(run_uri) else str(Path(run_uri) / "work")

    args = {key: value for key, value in recipe.items() if key not in PROFILE_KEYS}
    args.update(
        model_name_or_path=model_path,
        dataset=f"{config.data.dataset}-{tc.train_split}",
        overwrite_output_dir=False,
    )
    if tc.eval_split:
        args["eval_dataset"] = f"{config.data.dataset}-{tc.eval_split}"
    else:
        args.pop("eval_strategy", None)
        args.pop("do_eval", None)
    replaced = [key for key in PROFILE_KEYS if key in recipe and args.get(key) != recipe[key]]
    # Observability: effective (non-padding) tokens for tokens/s; LLaMA-Factory then logs them.
    # With neat_packing the attention mask is LLaMA-Factory's 4-D additive one, which transformers'
    # non_padding count sums into a large negative number (seen on the GPU recipes): count every
    # token of the packs there (padding is what packing leaves over, ~8% at 1024).
    args.setdefault("include_num_input_tokens_seen", "all" if args.get("neat_packing") else "non_padding")
    choice = training_dtype(config, recipe_path, recipe, model_path)
    args.update(llamafactory_precision(choice))
    training_rows, refusal = train_rows.check(config, args, dataset_files[tc.train_split], str(recipe_path))
    if refusal:
        raise TrainError(refusal)
    return TrainPlan(run_id, run_uri, work_dir, dataset_uri, args, str(recipe_path), dataset_files,
                     dtype=choice.as_dict(), replaced_keys=replaced, training_rows=training_rows)


def training_dtype(config: PipelineConfig, recipe_path: Path, recipe: dict[str, Any], model_path: str):
    """The training dtype (e2e_llm.precision), checked against the recipe and the checkpoint.

    LLaMA-Factory's ``bf16``/``fp16`` keys are derived from it: on a GPU a recipe may repeat the
    derived value but not contradict it; on CPU both are off whatever a (GPU) recipe says, since
    HF's CPU autocast is not used. On CPU the weights load in the checkpoint's own dtype, so a
    local checkpoint prepared in another dtype is refused (``e2e-llm model`` converts it again)."""
    from e2e_llm.model import prepared_dtype
    from e2e_llm.precision import choose_dtype, llamafactory_precision, train_device

    choice = choose_dtype(config.model.dtype, train_device(config))
    derived = llamafactory_precision(choice)
    if recipe.get("pure_bf16") and choice.dtype != "bfloat16":
        raise TrainError(f"{recipe_path}: pure_bf16 but this run trains in {choice.line()}")
    for key, value in derived.items():
        if key in recipe and bool(recipe[key]) != value and (value or config.train.use_gpu):
            raise TrainError(f"{recipe_path}: {key}: {recipe[key]} contradicts the training dtype "
                             f"{choice.line()}; set model.dtype in the profile instead")
    saved = prepared_dtype(Path(model_path)) if Path(model_path).is_dir() else None
    if not config.train.use_gpu and saved and saved != choice.dtype:
        raise TrainError(f"{model_path} was prepared in {saved} but this machine trains in {choice.line()}: "
                         f"run `e2e-llm model --profile {config.profile}` (make model) to convert it again")
    return choice



# ---------------------------------------------------------------------------------------
# Driver


def failure_cause(exc: BaseException) -> str:
    """The line that says why: Ray Train's error ends with the failed worker's exception line,
    after a truncated copy of the traceback Ray has already logged."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def workers_do_not_fit(config: PipelineConfig, available: dict[str, float]) -> str | None:
    """Why the profile's worker group can never start on a Ray instance of ``available`` resources,
    or None. Ray Train would wait for them, fail after 60 s and try again, for ever."""
    tc = config.train
    per_worker = dict(tc.resources_per_worker) or {"CPU": 1.0}
    if tc.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    for resource, amount in per_worker.items():
        needed = amount * tc.num_workers
        if needed > available.get(resource, 0.0):
            has = f"{available.get(resource, 0.0):g}"
            if resource == "CPU" and (budget := cpu_budget()).limited:
                has += f" ({budget.describe()})"
            return (f"{config.source_file}: train.num_workers {tc.num_workers} x {resource} {amount:g} a worker "
                    f"(resources_per_worker) = {needed:g} {resource}, and this machine's Ray instance has "
                    f"{has}: lower them, or set RAY_ADDRESS to a cluster that has them")
    return None


def storage_not_shared(config: PipelineConfig) -> str | None:
    """Why the profile's local storage root will not do on the Ray cluster joined: every worker
    reads the dataset and writes checkpoints there, so each node must see the same folder. Without
    this a worker on another node failed on the dataset path, every restart again, after loading
    the model."""
    if storage.is_remote(config.storage.root):
        return None
    root = config.storage_uri("runs")
    if missing := nodes_not_seeing(root):
        return (f"storage.root {config.storage.root} ({root}) is not shared by the Ray cluster at "
                f"${RAY_ADDRESS_ENV}: {len(missing)} of its nodes ({', '.join(n[:12] for n in missing)}) do not "
                "see a file written there. Ray Train needs storage every node reaches: s3://, gs://, or one "
                "shared filesystem mounted at the same path on every node")
    return None


def resume_hint(plan: TrainPlan, fs_kw: dict[str, Any]) -> str:
    """How to go on with an unfinished run, from the checkpoints its workers recorded."""
    try:
        steps = [event["step"] for event in read_events(plan.run_uri, fs_kw) if event.get("event") == "checkpoint"]
    except Exception:  # noqa: BLE001  the storage itself failing: the hint without the step
        return f"rerun with --run-id {plan.run_id} to resume from its last checkpoint"
    since = f"its last checkpoint (step {max(steps)})" if steps else "the start (no checkpoint yet)"
    return f"rerun with --run-id {plan.run_id} to resume from {since}"


def clear_work_dirs(plan: TrainPlan, timeout_s: float = 30.0) -> None:
    """The run's work dir removed from every node once Ray Train is done with it (finished, failed
    or stopped: a rerun resumes from the run's storage, never from there). With remote storage it is
    on each node's own disk, where a long-lived cluster kept every run's dataset copy and HF outputs
    until the disk filled. With local storage it is the run's own folder, and stays."""
    if plan.work_dir is not None:
        return
    try:
        cleared = on_every_node(remove_node_work_dir, plan.run_id, timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001  never in place of the run's own outcome
        cleared, why = None, f": {exc}"
    else:
        why = f" within {timeout_s:g} s"
    if cleared is None:
        print(f"[train] warning: the run's workers' folder ({TRAIN_WORK_DIR}/{plan.run_id} in each node's "
              f"temp folder) not removed from every node{why}", flush=True)


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """While Ray Train runs: SIGTERM (a cancelled job, a preempted or stopped pod, `kill`) and a
    hangup take Ctrl-C's path, Ray Train's graceful abort that keeps the run's checkpoints. Left to
    Ray, SIGTERM made the driver print a crash dump and die with SIGABRT (status 134); a hangup
    killed it outright. Yields those signals as they come."""
    from e2e_llm.hangup import on_stop_signals, restore

    seen: list[int] = []

    def as_ctrl_c(signum, frame):
        seen.append(signum)
        signal.raise_signal(signal.SIGINT)

    previous = on_stop_signals(as_ctrl_c, (signal.SIGTERM, signal.SIGHUP))
    try:
        yield seen
    finally:
        restore(previous)


def _ensure_ray(config: PipelineConfig, ray_temp_dir: str | None) -> bool:
    """Connect to $RAY_ADDRESS (clusters) or start a local instance; returns True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if problem := unreachable_ray_address():
        raise TrainError(problem)
    runtime_env = {"env_vars": worker_env(config), "worker_process_setup_hook": "e2e_llm.train_worker.setup_process"}
    if os.environ.get(RAY_ADDRESS_ENV):
        ray.init(runtime_env=runtime_env)
        return True
    kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": {**runtime_env, **own_instance_runtime_env()},
                              "num_cpus": max(usable_cpus(), config.train.num_workers)}
    if ray_temp_dir:
        kwargs["_temp_dir"] = ray_temp_dir
    ray.init(**kwargs)
    return True


def worker_env(config: PipelineConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "HF_HUB_OFFLINE", "DISABLE_VERSION_CHECK",
                                      "LLAMAFACTORY_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE",
                                      "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                                      "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "HF_TOKEN")
           if k in os.environ}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("DISABLE_VERSION_CHECK", "1")  # LLaMA-Factory pins; our lock file is the source of truth
    env[USE_RAY_ENV] = "0"  # Ray Train runs the workers; LLaMA-Factory's own Ray launcher stays off
    # Ray Train v2 patches print() in workers to also log through the root logger; a worker's
    # stdout is not sys.__stdout__ there, so each `[train] step` line was printed twice.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not config.train.use_gpu:
        # One OpenMP pool per worker sized to its CPU share; more threads only fight each other.
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(config.train.resources_per_worker.get("CPU", 1)))))
        # On CPU the workers are the job: at Ray's worker niceness 15 its own daemons and any other
        # process preempt them (2 AVX2 cores: 1.80 s a step at 15, 1.60 at 0; bench/RESULTS.md).
        env.setdefault(RAY_WORKER_NICENESS_ENV, "0")
    return env


def run_training(config: PipelineConfig, run_id: str | None = None, overrides: dict[str, Any] | None = None,
                 ray_temp_dir: str | None = None) -> dict[str, Any]:
    """Train, publish the adapter and write the manifest; returns the manifest."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    plan = plan_run(config, run_id, overrides)
    fs_kw = config.storage_kw()
    if storage.exists(storage.join(plan.run_uri, "manifest.json"), **fs_kw):
        raise TrainError(f"run {plan.run_id} already finished at {plan.run_uri}; pick a new --run-id")
    started_ray = _ensure_ray(config, ray_temp_dir)
    print(f"[train] run {plan.run_id}: {config.train.num_workers} Ray Train workers, outputs in {plan.run_uri}",
          flush=True)
    print(f"[train] dtype: {plan.dtype['dtype']} on {plan.dtype['device']} ({plan.dtype['reason']})", flush=True)
    for line in train_rows.notices(plan.training_rows):
        print(f"[train] {line}", flush=True)
    if plan.replaced_keys:
        print(f"[train] not used from {plan.recipe_path}: {', '.join(plan.replaced_keys)} (set for each run "
              "from the profile and the run id)", flush=True)
    start = time.time()
    try:
        tc = config.train
        if os.environ.get(RAY_ADDRESS_ENV) and (problem := storage_not_shared(config)):
            raise TrainError(problem)
        fixed_size = started_ray and not os.environ.get(RAY_ADDRESS_ENV)  # our own instance: nothing scales up
        if fixed_size and (problem := workers_do_not_fit(config, ray.cluster_resources())):
            raise TrainError(problem)
        scaling = ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=dict(tc.resources_per_worker) or None,
            accelerator_type=tc.accelerator_type,
        )
        if storage.is_remote(config.storage.root):
            fs, root_path = storage.filesystem(config.storage_uri("runs"), **fs_kw)
            run_config = RunConfig(name=plan.run_id, storage_path=root_path, storage_filesystem=fs,
                                   failure_config=FailureConfig(max_failures=tc.max_failures),
                                   checkpoint_config=CheckpointConfig(num_to_keep=2))
        else:
            run_config = RunConfig(name=plan.run_id, storage_path=config.storage_uri("runs"),
                                   failure_config=FailureConfig(max_failures=tc.max_failures),
                                   checkpoint_config=CheckpointConfig(num_to_keep=2))
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"args": plan.args, "work_dir": plan.work_dir, "run_id": plan.run_id,
                               "run_uri": plan.run_uri, "dataset_uri": plan.dataset_uri, "fs_kw": fs_kw,
                               "model_kw": config.object_store_kw()},
            scaling_config=scaling,
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
            run_config=run_config,
        )
        try:
            with _sigterm_as_ctrl_c() as terminated:
                result = trainer.fit()
        except TrainingFailedError as exc:  # Ray Train v2 raises what v1 returned in result.error
            raise TrainError(f"training failed (after {tc.max_failures} restart(s) allowed by train.max_failures): "
                             f"{failure_cause(exc)} (the workers' tracebacks are above)") from exc
        except SystemExit:  # Ray Train's own Ctrl-C handler aborts the run, then exits from inside fit() (status 0)
            how = f"terminated ({signal.Signals(terminated[0]).name})" if terminated else "interrupted"
            raise TrainInterrupted(f"{how}; {resume_hint(plan, fs_kw)}",
                                   terminated[0] if terminated else signal.SIGINT) from None
        except ray.exceptions.ActorDiedError as exc:  # its controller gone another way
            raise TrainError(f"Ray Train's controller died ({failure_cause(exc)}); "
                             f"{resume_hint(plan, fs_kw)}") from None
        if result.error:
            raise TrainError(f"training failed: {result.error}")
    finally:
        clear_work_dirs(plan)
        if started_ray:
            ray.shutdown()
    manifest = train_report.write_manifest(config, plan, wall_time=time.time() - start, fs_kw=fs_kw)
    return manifest
