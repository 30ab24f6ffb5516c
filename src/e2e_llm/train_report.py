# SPDX-License-Identifier: Apache-2.0
"""What a finished ``e2e-llm train`` run's manifest is made of (``e2e_llm.train.write_manifest``):
its loss history from LLaMA-Factory's ``trainer_state.json`` / ``all_results.json``, the loss
curve (``loss.png``), the versions of the training stack and the project's git sha.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

from e2e_llm import storage


def git_sha(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_log(run_uri: str, fs_kw: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    state_uri = storage.join(run_uri, "trainer_state.json")
    state = json.loads(storage.read_text(state_uri, **fs_kw))
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
