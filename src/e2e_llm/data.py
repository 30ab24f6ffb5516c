# SPDX-License-Identifier: Apache-2.0
"""Data ingestion: fetch split files, validate every row, write clean JSONL for LLaMA-Factory.

Input rows are alpaca (``instruction``/``input``/``output``) or sharegpt (``conversations``
with ``from``/``value`` or ``messages`` with ``role``/``content``, one system, one user and
one assistant turn). Output is always alpaca, so training, batch inference and serving share
one chat layout: system = instruction, user = input, assistant = output.

Nothing is lost: every source line becomes a clean row or a line in ``rejects.jsonl`` with
the source file, line number and reason, and ``rows_in == rows_clean + rows_rejected``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2e_llm.task import MRError, TaskSchema

if TYPE_CHECKING:
    from e2e_llm.config import PipelineConfig

ALPACA_FIELDS = ("instruction", "input", "output")
# LLaMA-Factory alpaca column mapping that puts `instruction` in the system turn: the
# tutorial's `prompt: instruction, query: input` would put both in the user turn.
ALPACA_COLUMNS = {"system": "instruction", "prompt": "input", "response": "output"}
_ROLE_ALIASES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class IngestError(RuntimeError):
    """A problem with a whole file (missing, empty, unreadable); row problems are rejects."""


@dataclass
class Reject:
    source: str
    line: int
    reason: str
    raw: str


@dataclass
class SplitReport:
    split: str
    source: str
    rows_in: int = 0
    rows_clean: int = 0
    rows_rejected: int = 0
    sha256: str = ""


@dataclass
class IngestReport:
    output_dir: str
    splits: list[SplitReport] = field(default_factory=list)
    system_prompt: str | None = None  # every row's instruction, when the profile sets one
    task: dict[str, str] | None = None  # the schema the rows were validated with: name, fingerprint

    @property
    def rows_in(self) -> int:
        return sum(s.rows_in for s in self.splits)

    @property
    def rows_rejected(self) -> int:
        return sum(s.rows_rejected for s in self.splits)

    def table(self) -> str:
        lines = [f"{'split':<8} {'in':>7} {'clean':>7} {'rejected':>9}  source"]
        for s in self.splits:
            lines.append(f"{s.split:<8} {s.rows_in:>7} {s.rows_clean:>7} {s.rows_rejected:>9}  {s.source}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "splits": [asdict(s) for s in self.splits],
                "system_prompt": self.system_prompt, "task": self.task}


REPORT_FILE = "ingest_report.json"


def task_fingerprint(task: TaskSchema) -> str:
    """The schema's content, not its file's layout: comments and key order do not change it."""
    return hashlib.sha256(json.dumps(task.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def ingest_mismatch(config: PipelineConfig) -> str | None:
    """Why the dataset ``e2e-llm data`` wrote for ``config`` is not what the profile now asks for,
    or None (also when there is none yet). A profile's ``data.system_prompt`` or task schema edited
    after the data stage would otherwise train and score on rows asked and validated the old way."""
    from e2e_llm import storage

    uri = config.storage_uri("data", config.data.dataset, REPORT_FILE)
    if not storage.exists(uri, **config.storage_kw()):
        return None
    report = json.loads(storage.read_text(uri, **config.storage_kw()))
    redo = f"rerun `e2e-llm data --profile {config.profile}`"
    if report.get("system_prompt") != config.data.system_prompt:
        return (f"the dataset was written with data.system_prompt {report.get('system_prompt')!r} and the profile "
                f"now says {config.data.system_prompt!r}: {redo}")
    written_with = report.get("task")  # None: written before the report recorded it
    if written_with and written_with.get("sha256") != task_fingerprint(config.task_schema()):
        return f"the dataset was validated with another version of the task schema {config.data.task}: {redo}"
    return None


# ---------------------------------------------------------------------------------------
# Fetching


def _atomic_target(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(dest.name + ".part")


def download(url: str, dest: Path, *, retries: int = 4, timeout: float = 30.0, backoff: float = 0.5) -> Path:
    """Download ``url`` to ``dest``: resumes a partial ``.part`` file with HTTP Range,
    retries transient failures, and renames into place only when complete."""
    part = _atomic_target(dest)
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                resumed = have and response.status == 206
                expected = response.headers.get("Content-Length")
                expected_total = (have if resumed else 0) + int(expected) if expected else None
                with open(part, "ab" if resumed else "wb") as out:
                    shutil.copyfileobj(response, out)
            size = part.stat().st_size
            if expected_total is not None and size != expected_total:
                raise OSError(f"short read: {size} of {expected_total} bytes")
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # our partial file is already complete or bogus
                part.unlink(missing_ok=True)
            if exc.code == 404:
                part.unlink(missing_ok=True)
                raise IngestError(f"{url}: not found (HTTP 404)") from exc
            if 400 <= exc.code < 500 and exc.code not in (408, 416, 429):
                part.unlink(missing_ok=True)
                raise IngestError(f"{url}: HTTP {exc.code}") from exc
            last_error = exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last_error = exc
        time.sleep(backoff * (2**attempt))
    part.unlink(missing_ok=True)
    raise IngestError(f"{url}: download failed after {retries + 1} attempts: {last_error}")


def fetch_split(source: str, filename: str, dest: Path) -> Path:
    """Fetch ``filename`` from ``source`` (http(s) base URL or a directory) into ``dest``."""
    if source.startswith(("http://", "https://")):
        return download(source.rstrip("/") + "/" + filename, dest)
    src = Path(source) / filename
    if not src.is_file():
        raise IngestError(f"{src}: split file not found")
    part = _atomic_target(dest)
    shutil.copyfile(src, part)
    os.replace(part, dest)
    return dest


# ---------------------------------------------------------------------------------------
# Validation


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _alpaca_from_sharegpt(obj: dict[str, Any]) -> dict[str, str]:
    turns = obj.get("conversations", obj.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' (or 'messages') must be a non-empty list")
    by_role: dict[str, str] = {}
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _ROLE_ALIASES:
            raise ValueError(f"turn {i}: unknown role {role!r}")
        role = _ROLE_ALIASES[role]
        if role in by_role:
            raise ValueError(f"turn {i}: more than one {role} turn (single-turn tasks only)")
        if not isinstance(text, str):
            raise ValueError(f"turn {i}: text must be a string")
        by_role[role] = text
    system = obj.get("system", by_role.get("system", ""))
    return {"instruction": system, "input": by_role.get("user", ""), "output": by_role.get("assistant", "")}


def validate_row(line: str, task: TaskSchema, fmt: str, default_instruction: str | None = None) -> dict[str, str]:
    """Return the clean alpaca row for one JSONL line, or raise ValueError with the reason."""
    try:
        obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"row must be a JSON object, got {type(obj).__name__}")
    row = _alpaca_from_sharegpt(obj) if fmt == "sharegpt" else obj
    if fmt == "sharegpt" and not row["instruction"] and default_instruction:
        row["instruction"] = default_instruction
    clean = {}
    for name in ALPACA_FIELDS:
        if name not in row:
            raise ValueError(f"field {name!r} missing")
        value = row[name]
        if not isinstance(value, str):
            raise ValueError(f"field {name!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ValueError(f"field {name!r} is empty")
        clean[name] = value.replace("\r\n", "\n").strip()
    try:
        task.parse(clean["output"])
    except MRError as exc:
        raise ValueError(f"field 'output' is not a valid meaning representation: {exc}") from None
    return clean


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, raw bytes) with a UTF-8 BOM and CR/LF endings removed."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if raw.strip():
            yield number, raw


def validate_file(
    path: Path, task: TaskSchema, fmt: str, source_name: str | None = None, system_prompt: str | None = None
) -> tuple[list[dict[str, str]], list[Reject]]:
    """Clean rows and rejects of one split file. ``system_prompt`` (the profile's
    ``data.system_prompt``) replaces every clean row's instruction: what the adapter is trained
    with is what batch, canary and clients ask it with, since they all read the clean rows."""
    if not path.is_file():
        raise IngestError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise IngestError(f"{source_name or path}: file is empty")
    clean: list[dict[str, str]] = []
    rejects: list[Reject] = []
    name = source_name or str(path)
    for number, raw in iter_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rejects.append(Reject(name, number, f"not UTF-8: byte {exc.start}", raw.decode("utf-8", "replace")))
            continue
        try:
            row = validate_row(line, task, fmt, task.default_instruction())
            clean.append({**row, "instruction": system_prompt} if system_prompt else row)
        except ValueError as exc:
            rejects.append(Reject(name, number, str(exc), line))
    if not clean and not rejects:
        raise IngestError(f"{name}: file has no rows")
    return clean, rejects


# ---------------------------------------------------------------------------------------
# Writing


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
        out.write(text)
    os.replace(tmp, path)


def jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def dataset_info(dataset: str, splits: list[str]) -> dict[str, Any]:
    """LLaMA-Factory's dataset registry; file names are relative to ``dataset_dir``."""
    return {
        f"{dataset}-{split}": {"file_name": f"{split}.jsonl", "formatting": "alpaca", "columns": ALPACA_COLUMNS}
        for split in splits
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ingest(
    *,
    source: str,
    splits: dict[str, str],
    output_dir: Path,
    task: TaskSchema,
    dataset: str,
    fmt: str = "alpaca",
    required: list[str] | tuple[str, ...] = ("train",),
    system_prompt: str | None = None,
) -> IngestReport:
    """Fetch, validate and write every split available at ``source``.

    Splits named in ``required`` must exist; optional ones (the withheld ``test``) are
    skipped with a note when the source does not have them.
    """
    output_dir = Path(output_dir)
    raw_dir = output_dir / "raw"
    report = IngestReport(str(output_dir), system_prompt=system_prompt,
                          task={"name": task.name, "sha256": task_fingerprint(task)})
    all_rejects: list[Reject] = []
    written: list[str] = []
    for split, filename in splits.items():
        try:
            raw = fetch_split(source, filename, raw_dir / filename)
        except IngestError:
            if split in required:
                raise
            continue
        clean, rejects = validate_file(raw, task, fmt, source_name=filename, system_prompt=system_prompt)
        out = output_dir / f"{split}.jsonl"
        write_atomic(out, jsonl(clean))
        all_rejects.extend(rejects)
        written.append(split)
        report.splits.append(
            SplitReport(split, filename, len(clean) + len(rejects), len(clean), len(rejects), sha256_file(out))
        )
    missing = [s for s in required if s not in written]
    if missing:
        raise IngestError(f"required split(s) {missing} not configured in data.splits")
    write_atomic(output_dir / "rejects.jsonl", jsonl([asdict(r) for r in all_rejects]))
    write_atomic(output_dir / "dataset_info.json", json.dumps(dataset_info(dataset, written), indent=2) + "\n")
    write_atomic(output_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def parse_jsonl(text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of each non-blank line of JSONL ``text``. Lines end at "\\n" alone: the
    rows are written with ``ensure_ascii=False``, so a text may hold U+2028 and the other characters
    ``str.splitlines`` also breaks at."""
    return [(number, json.loads(line)) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def read_jsonl(uri: str | Path, **kw: Any) -> list[dict[str, Any]]:
    """The rows of a JSONL file, local or in object storage (``kw``: :mod:`e2e_llm.storage`'s)."""
    from e2e_llm import storage

    return [row for _, row in parse_jsonl(storage.read_text(str(uri), **kw))]


def shared_instruction(rows: Iterable[dict[str, Any]], default: str) -> str | None:
    """The instruction every row asks with (a row without one asks with ``default``, the task's),
    or None where they differ: what an adapter trained on the rows learned to be asked (its
    training manifest records it) and what a batch run asks it with."""
    seen = {row.get("instruction") or default for row in rows}
    return seen.pop() if len(seen) == 1 else None


def chat_messages(row: dict[str, Any], default_instruction: str = "") -> list[dict[str, str]]:
    """A row as the engines are asked it (batch, canary probes; training checks its prompt against
    this): system = its instruction (``default_instruction`` for a row without one), user = its
    input, the layout LLaMA-Factory trains it in (:data:`ALPACA_COLUMNS`)."""
    return [{"role": "system", "content": row.get("instruction") or default_instruction},
            {"role": "user", "content": row["input"]}]


# Why rows asking an adapter otherwise than it learned do not measure it (VIGGO val, the GPU
# quality adapter: exact match 0.766 asked with the local profile's short system prompt against
# 0.927 with VIGGO's own instruction it was trained on; bench/RESULTS.md).
ASKED_OTHERWISE = "an adapter asked otherwise than it learned answers worse"


def asked_otherwise(training_manifest: dict[str, Any] | None, rows: list[dict[str, Any]],
                    default: str) -> tuple[str, str] | None:
    """(the instruction it was trained with, the one ``rows`` ask with) where an adapter's training
    rows all asked with one instruction (its training manifest's ``dataset.instruction``) and
    ``rows`` all ask with another; None when they agree or either side is unknown (an older
    manifest, rows with several instructions)."""
    trained = ((training_manifest or {}).get("dataset") or {}).get("instruction")
    asked = shared_instruction(rows, default) if rows else None
    return None if trained is None or asked is None or trained == asked else (trained, asked)


def quoted(text: str, width: int = 70) -> str:
    """``text`` in quotes, cut to ``width`` characters (an instruction in a message)."""
    return repr(text if len(text) <= width else text[:width - 1] + "…")
