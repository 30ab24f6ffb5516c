# SPDX-License-Identifier: Apache-2.0
"""Publishing a trained adapter to the adapter store once per training run.

``e2e-llm serve --publish`` and ``e2e-llm canary --adapter`` both accept a trained adapter
(folder, run id, ``latest``) and publish it on first use; a rerun finds the version published
before instead of adding another. ``e2e-llm publish`` always publishes a new version (that is what
it is asked to do). All of them refuse an adapter whose rank the serving replicas cannot load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def published_from_run(store, name: str, adapter_dir: str | Path, manifest: dict[str, Any]) -> str | None:
    """The newest version of ``name`` already published from this training run (same run id)
    or from the same adapter folder; None when there is none."""
    source = str(adapter_dir) if "://" in str(adapter_dir) else str(Path(adapter_dir).resolve())
    run_id = manifest.get("run_id")
    for row in reversed(store.versions(name)):
        if (run_id and row.get("run_id") == run_id) or row.get("source") == source:
            return row["id"]
    return None


def publish_once(config, store, adapter_dir: str | Path, manifest: dict[str, Any],
                 name: str | None = None) -> tuple[str, bool]:
    """(adapter id, newly published): the version published from this run before, or a new one."""
    from e2e_llm.serve import serving_max_lora_rank

    name = name or config.data.dataset
    if existing := published_from_run(store, name, adapter_dir, manifest):
        return existing, False
    return store.publish(adapter_dir, name=name, manifest=manifest, max_rank=serving_max_lora_rank(config)), True
