# SPDX-License-Identifier: Apache-2.0
"""Batch inputs: a split name or JSONL path resolved to a URI, and its rows read with every
bad row kept and flagged (it never reaches the engine; it comes out with ``error`` set)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.config import PipelineConfig
from e2e_llm.data import ingest_mismatch


class BatchError(RuntimeError):
    """A batch run that cannot start: unknown split, empty data, bad adapter."""


def resolve_split(config: PipelineConfig, split: str) -> str:
    """URI of a split name (``val``, ``test``: the clean files under ``<storage>/data``) or
    of a JSONL file given by path/URI."""
    if split in config.data.splits:
        uri = config.storage_uri("data", config.data.dataset, f"{split}.jsonl")
        if not storage.exists(uri, **config.storage_kw()):
            optional = "; the source may not ship this split" if split not in config.data.required_splits else ""
            raise BatchError(f"split {split!r}: {uri} not found (run `e2e-llm data --profile {config.profile}`"
                             f"{optional})")
        if problem := ingest_mismatch(config):
            raise BatchError(f"split {split!r}: {problem}")
        return uri
    if split.endswith((".jsonl", ".json")) or "/" in split or "://" in split:
        uri = split if "://" in split else str(Path(split).expanduser().resolve())
        if not storage.exists(uri, **config.storage_kw()):
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
    data = storage.read_bytes(uri, **config.storage_kw())
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
            elif row.get("output") is not None and not isinstance(row["output"], str):
                reason = f"{uri}:{number}: field 'output' (the reference) must be a string"
            else:
                reason = ""
        if reason:
            invalid[number] = reason
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise BatchError(f"{uri}: no rows (empty dataset)")
    return InputRows(uri, digest, rows, invalid)
