# SPDX-License-Identifier: Apache-2.0
"""A finished ``e2e-llm train`` run's manifest (:func:`write_manifest`) and what it is made of:
its loss history from LLaMA-Factory's ``trainer_state.json`` / ``all_results.json``, the loss
curve (``loss.png``), the versions of the training stack and the project's git sha.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from e2e_llm import storage
from e2e_llm.data import parse_jsonl, shared_instruction
from e2e_llm.train_worker import read_events

if TYPE_CHECKING:
    from e2e_llm.config import PipelineConfig


class PlannedRun(Protocol):
    """What the manifest reads of ``e2e_llm.train.TrainPlan`` (which imports this module)."""

    run_id: str
    run_uri: str
    args: dict[str, Any]
    recipe_path: str
    dataset_files: dict[str, str]
    dtype: dict[str, Any]
    training_rows: dict[str, Any]


def git_sha(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_state(run_uri: str, fs_kw: dict[str, Any]) -> dict[str, Any]:
    """The HF Trainer's ``trainer_state.json`` the run published."""
    return json.loads(storage.read_text(storage.join(run_uri, "trainer_state.json"), **fs_kw))


def read_log(state: dict[str, Any], run_uri: str, fs_kw: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(train, eval) log entries of a run's trainer state, with the closing evaluation."""
    history = state.get("log_history", [])
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    # LLaMA-Factory's closing evaluate() (do_eval) runs after trainer_state.json is saved: its
    # figures are only in all_results.json. Recipes that evaluate once, at the end, rely on it.
    results_uri = storage.join(run_uri, "all_results.json")
    if storage.exists(results_uri, **fs_kw):
        final = json.loads(storage.read_text(results_uri, **fs_kw))
        step = state.get("global_step")
        if "eval_loss" in final and not any(h.get("step") == step for h in evals):
            evals.append({"step": step, "eval_loss": final["eval_loss"]})
    return train, evals


def plot_loss(train: list[dict], evals: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss")
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("llamafactory", "ray", "transformers", "torch", "peft", "e2e-llm"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def write_manifest(config: PipelineConfig, plan: PlannedRun, wall_time: float, fs_kw: dict[str, Any]) -> dict:
    state = read_state(plan.run_uri, fs_kw)
    train_log, eval_log = read_log(state, plan.run_uri, fs_kw)
    tokens = state.get("num_input_tokens_seen") or 0
    events = read_events(plan.run_uri, fs_kw)
    starts = [e for e in events if e["event"] == "start" and e["rank"] == 0]
    training_args = dict(plan.args)
    if starts and "output_dir" in starts[-1]:  # as the workers had it: on each node's own disk with object storage
        training_args["output_dir"] = starts[-1]["output_dir"]
    # The final entry (train_runtime, train_loss) covers the whole (resumed) run.
    closing = [h for h in state.get("log_history", []) if "train_runtime" in h]
    train_seconds = closing[-1]["train_runtime"] if closing else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_loss(train_log, eval_log, Path(tmp) / "loss.png")
        storage.write_bytes(storage.join(plan.run_uri, "loss.png"), png.read_bytes(), **fs_kw)
    dataset_files, instruction = {}, None
    for split, uri in plan.dataset_files.items():
        data = storage.read_bytes(uri, **fs_kw)
        dataset_files[split] = {"uri": uri, "sha256": hashlib.sha256(data).hexdigest(),
                                "rows": data.count(b"\n")}
        if split == config.train.train_split:
            rows = [row for _, row in parse_jsonl(data.decode("utf-8"))]
            instruction = shared_instruction(rows, config.task_schema().default_instruction())
    manifest = {
        "kind": "e2e-llm/train-run",
        "run_id": plan.run_id,
        "status": "completed",
        "profile": config.profile,
        "finished_at": datetime.now(UTC).isoformat(),
        "base_model": {"id": config.model.id, "source": config.model.source,
                       "path": plan.args["model_name_or_path"]},
        # the instruction every training row asked with (None: they differ): batch runs asking with
        # another are refused (e2e_llm.batch.adapter.instruction_mismatch)
        "dataset": {"name": config.data.dataset, "task": config.data.task, "files": dataset_files,
                    "instruction": instruction,
                    # the train rows against cutoff_len and the engines' prompt format (e2e_llm.train_rows)
                    "training_rows": plan.training_rows},
        "recipe": plan.recipe_path,
        "dtype": plan.dtype,  # the training dtype and why (CPU capability / GPU)
        "training_args": training_args,
        "ray": {"num_workers": config.train.num_workers, "use_gpu": config.train.use_gpu,
                "resources_per_worker": config.train.resources_per_worker,
                "accelerator_type": config.train.accelerator_type, "max_failures": config.train.max_failures},
        "versions": versions(),
        "git_sha": git_sha(config.root),
        "metrics": {
            # the last logging window's mean; none for a run shorter than logging_steps
            "train_loss": train_log[-1]["loss"] if train_log else None,
            # the Trainer's mean over the whole run (of the last attempt, where one resumed)
            "train_loss_mean": closing[-1].get("train_loss") if closing else None,
            "eval_loss": eval_log[-1]["eval_loss"] if eval_log else None,
            "global_step": state.get("global_step"),
            "max_steps": state.get("max_steps"),
            "tokens_seen": tokens,
            # transformers' non-padding count sums a 4-D neat-packing mask into nonsense (negative):
            # record no figure rather than a wrong one.
            "tokens_per_second": tokens / train_seconds if tokens > 0 and train_seconds else None,
            "wall_time_s": round(wall_time, 1),
        },
        "attempts": len(starts),
        "adapter_uri": storage.join(plan.run_uri, "adapter"),
        "loss_curve": storage.join(plan.run_uri, "loss.png"),
        "tensorboard": storage.join(plan.run_uri, "tensorboard"),
    }
    storage.write_text(storage.join(plan.run_uri, "manifest.json"), json.dumps(manifest, indent=2) + "\n", **fs_kw)
    return manifest
