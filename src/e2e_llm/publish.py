# SPDX-License-Identifier: Apache-2.0
"""Publishing a trained adapter to the adapter store once per training run.

``e2e-llm serve --publish`` and ``e2e-llm canary --adapter`` both accept a trained adapter
(folder, run id, ``latest``) and publish it on first use; a rerun finds the version published
before instead of adding another. ``e2e-llm publish`` always publishes a new version (that is what
it is asked to do). All of them refuse an adapter made for another base model (an alias moved to
it would fail every request) or whose rank the serving replicas cannot load (:func:`publish_new`).
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
    name = name or config.data.dataset
    if existing := published_from_run(store, name, adapter_dir, manifest):
        return existing, False
    return publish_new(config, store, adapter_dir, manifest, name), True


def publish_new(config, store, adapter_dir: str | Path, manifest: dict[str, Any], name: str | None = None,
                version: str | None = None, alias: str | None = None) -> str:
    """Publish ``adapter_dir`` as a new version of ``name`` (default ``data.dataset``), after
    checking that it fits the profile's base model and that its rank fits serving; returns its id."""
    from e2e_llm.adapters import check_fits_base
    from e2e_llm.model import model_location
    from e2e_llm.serve import serving_max_lora_rank

    check_fits_base(config, Path(adapter_dir), model_location(config.model, root=config.root), manifest)
    return store.publish(adapter_dir, name=name or config.data.dataset, version=version, alias=alias,
                         manifest=manifest, max_rank=serving_max_lora_rank(config))
