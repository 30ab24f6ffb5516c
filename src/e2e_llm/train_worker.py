# SPDX-License-Identifier: Apache-2.0
"""What runs inside each Ray Train worker of ``e2e-llm train`` (``e2e_llm.train`` starts them):
resume from Ray Train's checkpoint, run LLaMA-Factory with the callbacks our layer adds, report
every saved checkpoint to Ray Train, and publish the adapter from rank 0. Each worker records what
happened in the run's storage (``events/``, :func:`append_event`): the manifest counts attempts
from it, and the driver, on a cluster's head node, sees no worker's disk.

Several workers can share one machine's work dir (a node with several GPUs, the local profile's
two CPU workers), and a restarted worker group finds what its last attempt left there. So what a
worker reads from the work dir is made once per machine and never trusted half-made
(:func:`e2e_llm.node_temp.fill_once`), and the only checkpoint a run resumes from is the one Ray
Train registered: an HF checkpoint folder left in the output dir may be cut off mid-save, and on
every node but rank 0's it holds only that rank's RNG state. A base model kept in object storage
is copied to the node the same way (:mod:`e2e_llm.model_mirror`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.adapters import missing_adapter_files
from e2e_llm.model_mirror import loadable
from e2e_llm.node_temp import fill_once, own_temp_dir, remove

EVENTS_DIR = "events"
# With object storage, runs' workers' folders on each node: <own temp dir>/train-work/<run id>.
TRAIN_WORK_DIR = "train-work"
# Folders of the work dir that fill_once makes: the dataset (remote storage) and the checkpoint
# the run resumes from.
DATASET_DIR = "dataset"
RESUME_DIR = "resume"


def setup_process() -> None:
    """Ray's ``worker_process_setup_hook`` for every process of a training job (controller,
    workers, Ray Train's own actors): known-noise log records dropped (:mod:`e2e_llm.logs` says
    which, and why), and the process's own Ray instance named for Ray's State API
    (:func:`e2e_llm.ray_address.name_own_instance`)."""
    from e2e_llm.logs import quiet_known_noise
    from e2e_llm.ray_address import name_own_instance

    quiet_known_noise()
    name_own_instance()


def node_work_root() -> Path:
    """Where runs' workers keep their files on the node this runs on, with object storage: in this
    user's own temp folder there (:mod:`e2e_llm.node_temp`: ``TMPDIR`` of that node, else ``/tmp``)."""
    return Path(own_temp_dir()) / TRAIN_WORK_DIR


def node_work_dir(run_id: str) -> Path:
    return node_work_root() / run_id


def remove_node_work_dir(run_id: str) -> None:
    remove(node_work_dir(run_id))


def events_uri(run_uri: str) -> str:
    return storage.join(run_uri, EVENTS_DIR)


def append_event(run_uri: str, fs_kw: dict[str, Any], **event: Any) -> None:
    """Record ``event`` in the run's storage, one object each (object storage cannot append;
    workers on several nodes write at once)."""
    event.setdefault("time", time.time())
    name = f"{time.time_ns():020d}-{event.get('rank', 0)}-{os.getpid()}-{event['event']}.json"
    storage.write_text(storage.join(events_uri(run_uri), name), json.dumps(event) + "\n", **fs_kw)


def read_events(run_uri: str, fs_kw: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's events, oldest first; one that cannot be read or parsed is left out."""
    uri, events = events_uri(run_uri), []
    for name in storage.list_dir(uri, **fs_kw):
        try:
            events.append(json.loads(storage.read_text(storage.join(uri, name), **fs_kw)))
        except (OSError, ValueError):
            continue
    return events


def local_dataset(dataset_uri: str, work_dir: Path, fs_kw: dict[str, Any]) -> Path:
    """The dataset as a local folder: object storage is downloaded once per machine (each version
    of it, :func:`e2e_llm.storage.tree_version`); a local path is read where it is."""
    if not storage.is_remote(dataset_uri):
        return Path(dataset_uri)
    version = storage.tree_version(dataset_uri, **fs_kw)
    return fill_once(work_dir / DATASET_DIR, version, lambda tmp: storage.download_dir(dataset_uri, tmp, **fs_kw))


def restore_checkpoint(checkpoint: Any, work_dir: Path) -> tuple[Path, int]:
    """Ray Train's ``checkpoint`` as a local folder the HF Trainer resumes from (once per machine,
    named after Ray's checkpoint), and its step."""

    def copy(tmp: Path) -> None:
        # From its storage, not through Checkpoint.as_directory: Ray's download locks a file in
        # <temp dir>/_ray_lockfiles, a folder the machine's first Ray Train user owns, and another
        # user's restarted worker failed there (PermissionError). fill_once copies it once already.
        from pyarrow import fs as pafs

        pafs.copy_files(checkpoint.path, str(tmp), source_filesystem=checkpoint.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())

    local = fill_once(work_dir / RESUME_DIR, Path(checkpoint.path).name, copy)
    return local, int(json.loads((local / "trainer_state.json").read_text())["global_step"])


def clear_earlier_attempts(output: Path, resuming: bool) -> None:
    """What an earlier attempt left in the HF output dir that could be taken for this attempt's:
    every ``checkpoint-*`` folder (else LLaMA-Factory resumes on its own from the newest, which Ray
    Train may never have registered), and, for a run starting from step 0, everything (a final
    adapter there makes LLaMA-Factory refuse the folder). Safe while other workers of this machine
    run: none of this attempt writes there before every worker has passed this point (the
    first save needs a training step from each)."""
    if not output.is_dir():
        return
    for entry in output.iterdir():
        if not resuming or entry.name.startswith("checkpoint-"):
            remove(entry)


def training_callbacks() -> list:
    """What our layer adds to LLaMA-Factory's training besides Ray Train's checkpoint report
    (the benches' direct runs add the same, so both sides of a comparison train alike)."""
    from e2e_llm import lora_autocast

    return [lora_autocast.make_callback()]


def report_callback(run_uri: str, fs_kw: dict[str, Any], rank: int, world_size: int):
    """A transformers TrainerCallback reporting each saved checkpoint to Ray Train."""
    import ray.train
    from transformers import TrainerCallback

    class RayTrainReport(TrainerCallback):
        def __init__(self) -> None:
            self.last_logs: dict[str, float] = {}
            self.start = time.monotonic()
            self.start_step: int | None = None
            self.start_tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step
            self.start_tokens = state.num_input_tokens_seen or 0
            self.start = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            self.last_logs.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if rank == 0 and "loss" in logs:
                elapsed = time.monotonic() - self.start
                done = state.global_step - (self.start_step or 0)
                tokens = (state.num_input_tokens_seen or 0) - self.start_tokens
                eta = elapsed / done * (state.max_steps - state.global_step) if done else float("nan")
                print(f"[train] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                      f"tok/s {tokens / max(elapsed, 1e-9):.0f} eta {eta:.0f}s", flush=True)

        def on_save(self, args, state, control, **kwargs):
            ckpt_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = {"global_step": state.global_step, "epoch": state.epoch or 0.0, **self.last_logs}
            checkpoint = None
            if rank == 0 and ckpt_dir.is_dir():
                checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir))
            # Every rank reports (it is a barrier); only rank 0 carries the checkpoint files.
            ray.train.report(metrics, checkpoint=checkpoint)
            if rank == 0:
                append_event(run_uri, fs_kw, event="checkpoint", step=state.global_step, world_size=world_size)

    return RayTrainReport()


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs in each Ray Train worker: resume from Ray's checkpoint, train, publish the adapter."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    run_uri = cfg["run_uri"]
    work_dir = Path(cfg["work_dir"]) if cfg["work_dir"] else node_work_dir(cfg["run_id"])
    args = dict(cfg["args"], output_dir=str(work_dir / "output"))
    fs_kw = cfg["fs_kw"]

    args["dataset_dir"] = str(local_dataset(cfg["dataset_uri"], work_dir, fs_kw))
    args["model_name_or_path"] = loadable(args["model_name_or_path"], cfg["model_kw"])  # a URI: copied here
    resume_step = 0
    checkpoint = ray.train.get_checkpoint()
    clear_earlier_attempts(Path(args["output_dir"]), resuming=checkpoint is not None)
    if checkpoint is not None:
        resume_from, resume_step = restore_checkpoint(checkpoint, work_dir)
        args["resume_from_checkpoint"] = str(resume_from)
    append_event(run_uri, fs_kw, event="start", rank=rank, world_size=world_size, pid=os.getpid(),
                 node=ray.get_runtime_context().get_node_id(), output_dir=args["output_dir"], resume_step=resume_step,
                 attempt_checkpoint=checkpoint.path if checkpoint else None)

    from e2e_llm.compat.llamafactory import run_training

    run_training(args, [report_callback(run_uri, fs_kw, rank, world_size), *training_callbacks()])

    if rank == 0:
        output = Path(args["output_dir"])
        missing = missing_adapter_files(output)
        if missing:
            # Ray Train ends the run with it (the driver raises it as a TrainError).
            raise RuntimeError(f"training finished without {missing} in {output}")
        staging = work_dir / "publish"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "adapter").mkdir(parents=True)
        for name in os.listdir(output):
            src = output / name
            if src.is_file() and (name.startswith(("adapter_", "tokenizer", "special_tokens", "chat_template"))
                                  or name in ("README.md",)):
                shutil.copy2(src, staging / "adapter" / name)
        for name in ("trainer_log.jsonl", "trainer_state.json", "all_results.json"):
            if (output / name).is_file():
                shutil.copy2(output / name, staging / name)
        if (output / "runs").is_dir():  # transformers' default TensorBoard logging dir
            shutil.copytree(output / "runs", staging / "tensorboard")
        if storage.is_remote(run_uri):
            storage.upload_dir(staging, run_uri, **fs_kw)
        else:
            for item in staging.iterdir():
                dest = Path(run_uri) / item.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                shutil.move(str(item), dest)
        # The HF Trainer's checkpoints here are what Ray Train persisted at each report (the run's
        # checkpoint_* folders keep the last ones): once the adapter is out, a second copy of each
        # (~60 MB for SmolLM2, three per `make e2e`) only filled the disk.
        for checkpoint in output.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        shutil.rmtree(work_dir / RESUME_DIR, ignore_errors=True)
        append_event(run_uri, fs_kw, event="finished", rank=rank, world_size=world_size)
