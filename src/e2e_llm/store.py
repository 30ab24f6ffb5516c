# SPDX-License-Identifier: Apache-2.0
"""The adapter store: published LoRA adapters, their versions index and aliases.

Layout under the store URI (``config.adapters_uri()``), as Ray Serve LLM's
``dynamic_lora_loading_path`` expects it (one folder per adapter; the folder name is the
adapter id that clients call as ``<base model id>:<adapter id>``)::

    <store>/viggo-v1/adapter_config.json, adapter_model.safetensors, manifest.json
    <store>/viggo-v2/...
    <store>/index.json     {"adapters": {"viggo-v1": {name, version, run_id, rank, ...}}}
    <store>/aliases.json   {"viggo": {"stable": "viggo-v1", "candidate": "viggo-v2",
                                      "candidate_weight": 0.1, "revision": 3, ...}}
    <store>/alias-history-viggo.jsonl   every alias change: revision, new and previous record

The JSON files sit beside the adapter folders (Ray lists only sub-folders as adapters).
Batch and serve resolve a reference the same way everywhere (:meth:`AdapterStore.resolve`):
an adapter id, ``latest`` / ``<name>:latest`` (newest published version) or an alias (its
stable version).

Any number of writers may run at once (publishers, canary controllers, an operator): every
update is a compare-and-swap (:mod:`e2e_llm.cas`). Publishing first claims the version id by
creating ``<id>/manifest.json`` only if absent (a publisher that loses the claim takes the next
number, or fails for an explicit ``version``), then uploads the files under it, then adds it to
the index; an alias update either applies to the revision it was computed from or is retried
(``expected_revision``: fails instead). No update is lost and no folder mixes two publishers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from e2e_llm import cas, storage
from e2e_llm.adapters import AdapterError, require_adapter_files
from e2e_llm.config import API_NAME_RE, API_NAME_RULE, PipelineConfig

INDEX = "index.json"
ALIASES = "aliases.json"
MANIFEST = "manifest.json"
MAX_CLAIMS = 100  # version numbers tried by one publish before giving up


class StoreError(RuntimeError):
    pass


class AliasConflict(StoreError):
    """The alias is no longer at the revision an update was computed from."""
@dataclass
class Alias:
    """Traffic split of one alias: ``candidate_weight`` of requests go to the candidate."""

    stable: str
    candidate: str | None = None
    candidate_weight: float = 0.0
    revision: int = 0
    updated_at: float = field(default_factory=time.time)
    # Fields of the stored record this version does not know: a newer e2e-llm wrote it (an
    # upgraded canary controller, while this version's ingress still serves in a rolling
    # upgrade). Routing goes by the fields above; a change written by this version drops them.
    unknown: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_record(cls, name: str, record: Any, source: str) -> Alias:
        """The alias ``name`` as stored in ``source``; fields this version does not know are kept
        aside (:attr:`unknown`), a record without the ones it needs is a :class:`StoreError`."""
        if not isinstance(record, dict):
            raise StoreError(f"{source}: alias {name!r} is not a record: {record!r}")
        known = {f.name for f in fields(cls)} - {"unknown"}
        try:
            alias = cls(**{k: v for k, v in record.items() if k in known},
                        unknown={k: v for k, v in record.items() if k not in known})
        except TypeError as exc:
            raise StoreError(f"{source}: alias {name!r}: {exc}") from None
        if alias.unknown:
            warnings.warn(f"{source}: alias {name!r} has fields this e2e-llm does not know "
                          f"({', '.join(sorted(alias.unknown))}): written by a newer version; routing by "
                          "stable/candidate/candidate_weight only", UserWarning, stacklevel=2)
        return alias

    def pick(self, draw: float) -> str:
        """The version for a request, given a uniform draw in [0, 1)."""
        if self.candidate and draw < self.candidate_weight:
            return self.candidate
        return self.stable

    def to_dict(self) -> dict[str, Any]:
        """The record as stored, unknown fields included."""
        known = asdict(self)
        del known["unknown"]
        return {**self.unknown, **known}


def _base_model_id(manifest: dict[str, Any]) -> str | None:
    base = manifest.get("base_model")
    return base.get("id") if isinstance(base, dict) else base


def _check_name(kind: str, value: str) -> str:
    if not API_NAME_RE.match(value):
        raise StoreError(f"{kind} {value!r}: {API_NAME_RULE}")
    return value


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode()


def _writer() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


class AdapterStore:
    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None):
        self.uri = uri.rstrip("/")
        self._kw: dict[str, Any] = {}
        if storage.is_remote(self.uri):
            self._kw = {"endpoint_url": storage.s3_endpoint(endpoint_url), "region": region}

    @classmethod
    def from_config(cls, config: PipelineConfig) -> AdapterStore:
        return cls(config.adapters_uri(), config.storage.endpoint_url, config.storage.region)

    @property
    def storage_kw(self) -> dict[str, Any]:
        """The storage keyword arguments (S3 endpoint, region) for objects beside the adapters."""
        return dict(self._kw)

    def require_reachable(self) -> None:
        """A clear error when the store lives on a loopback S3 server that is not running."""
        from e2e_llm.local_s3 import LocalS3Error, require_reachable

        try:
            require_reachable(self._kw.get("endpoint_url"), f"the adapter store {self.uri}")
        except LocalS3Error as exc:
            raise StoreError(str(exc)) from None

    # -- low level ---------------------------------------------------------------------------

    def _uri(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def _read_json(self, name: str, default: Any) -> Any:
        # One GET of one version (pyarrow reads a size first, then a range: a concurrent
        # update in between would hand it a torn object).
        data = cas.read(self._uri(name), **self._kw).data
        if data is None:
            return default
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self._uri(name)}: not valid JSON ({exc})") from None

    def _ensure_bucket(self) -> None:
        """Create the bucket on first write (S3-compatible servers start empty)."""
        if getattr(self, "_bucket_ok", False) or not storage.is_remote(self.uri):
            return
        fs, path = storage.filesystem(self.uri, **self._kw)
        bucket = path.split("/", 1)[0]
        from pyarrow.fs import FileType

        if fs.get_file_info(bucket).type == FileType.NotFound:
            try:
                fs.create_dir(bucket)
            except OSError:  # another publisher may have created it a moment ago
                if fs.get_file_info(bucket).type == FileType.NotFound:
                    raise
        self._bucket_ok = True

    def _update(self, name: str, change: Callable[[bytes | None], bytes]) -> bytes:
        """Compare-and-swap update of one object beside the adapters (retried on conflict)."""
        self._ensure_bucket()
        try:
            return cas.update(self._uri(name), change, **self._kw).data
        except cas.TooManyConflicts as exc:
            raise StoreError(str(exc)) from None

    def _update_json(self, name: str, default: Any, change: Callable[[Any], Any]) -> Any:
        def apply(data: bytes | None) -> bytes:
            try:
                value = json.loads(data) if data is not None else json.loads(json.dumps(default))
            except json.JSONDecodeError as exc:
                raise StoreError(f"{self._uri(name)}: not valid JSON ({exc})") from None
            return _dumps(change(value))

        return json.loads(self._update(name, apply))

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, default=str).encode() + b"\n"
        self._update(name, lambda data: (data or b"") + line)

    def adapter_uri(self, adapter_id: str) -> str:
        return self._uri(adapter_id)

    # -- versions ------------------------------------------------------------------------------

    def index(self) -> dict[str, dict[str, Any]]:
        return self._read_json(INDEX, {"adapters": {}})["adapters"]

    def adapter_ids(self) -> list[str]:
        """Adapter folders actually present in the store (what Ray Serve LLM can load)."""
        # .json/.jsonl: index, aliases, alias histories and rollout logs; dot files: local locks.
        return [n for n in storage.list_dir(self.uri, **self._kw)
                if not n.endswith((".json", ".jsonl")) and not n.startswith(".")]

    def versions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Published versions, oldest first (by publish sequence number)."""
        rows = [{"id": k, **v} for k, v in self.index().items() if name is None or v.get("name") == name]
        return sorted(rows, key=lambda r: r.get("seq", 0))

    def latest(self, name: str | None = None) -> str:
        rows = self.versions(name)
        if not rows:
            raise StoreError(f"no adapters published{f' under {name!r}' if name else ''} in {self.uri}")
        return rows[-1]["id"]

    def publish(self, adapter_dir: str | Path, *, name: str, version: str | None = None,
                alias: str | None = None, manifest: dict[str, Any] | None = None,
                max_rank: int | None = None) -> str:
        """Copy an adapter folder (+ manifest) to ``<store>/<name>-<version>/`` and index it.

        ``version`` defaults to the next free ``vN`` for ``name``. With ``alias``, a new alias is
        created pointing at it, or an existing alias's stable version is moved to it.
        Safe to call from many processes at once: each call gets its own version.
        Returns the adapter id.
        """
        if "://" in str(adapter_dir):  # a run in object storage: stage it locally first
            with tempfile.TemporaryDirectory() as tmp:
                local = storage.download_dir(str(adapter_dir), Path(tmp) / "adapter", **self._kw)
                return self.publish(local, name=name, version=version, alias=alias,
                                    manifest={**(manifest or {}), "adapter_uri": str(adapter_dir)}, max_rank=max_rank)
        adapter_dir = Path(adapter_dir)
        try:
            require_adapter_files(adapter_dir)
        except AdapterError as exc:
            raise StoreError(str(exc)) from None
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        rank = int(adapter_config.get("r", 0))
        if max_rank is not None and rank > max_rank:
            raise StoreError(f"{adapter_dir}: LoRA rank {rank} exceeds the serving max_lora_rank {max_rank} "
                             "(derived from the training recipe's lora_rank)")
        _check_name("adapter name", name)
        if version is not None:
            _check_name("version", version)
        manifest = dict(manifest or {})
        self._ensure_bucket()
        adapter_id, published = self._claim(name, version, manifest, str(adapter_dir.resolve()))
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / adapter_id
            staged.mkdir()
            for f in adapter_dir.iterdir():
                if f.is_file() and f.name != MANIFEST:
                    (staged / f.name).write_bytes(f.read_bytes())
            storage.upload_dir(staged, self.adapter_uri(adapter_id), **self._kw)

        entry = {
            "name": name,
            "version": published["version"],
            "rank": rank,
            "base_model": _base_model_id(manifest) or adapter_config.get("base_model_name_or_path"),
            "run_id": manifest.get("run_id"),
            "published_at": published["published_at"],
            "source": manifest.get("adapter_uri") or published["source"],
        }

        def add(index: dict[str, Any]) -> dict[str, Any]:
            adapters = index.setdefault("adapters", {})
            if adapter_id in adapters:  # only a store written before version claims can get here
                raise StoreError(f"{adapter_id} is already in {self._uri(INDEX)}")
            seq = max((v.get("seq", 0) for v in adapters.values()), default=0) + 1
            adapters[adapter_id] = {**entry, "seq": seq}
            return index

        self._update_json(INDEX, {"adapters": {}}, add)
        if alias:
            self._write_alias(alias, lambda current: (adapter_id, current.candidate, current.candidate_weight)
                              if current else (adapter_id, None, 0.0), reason=f"published {adapter_id}")
        return adapter_id

    def _claim(self, name: str, version: str | None, manifest: dict[str, Any],
               source: str) -> tuple[str, dict[str, Any]]:
        """Claim ``<name>-<version>`` by creating its manifest only if absent; the next free
        ``vN`` when ``version`` is None. Returns the adapter id and the manifest's ``published``."""
        index, aliases = self.index(), self.aliases()
        if version is not None:
            versions = [version]
        else:
            numbers = [int(m.group(1)) for v in index.values()
                       if v.get("name") == name and (m := re.fullmatch(r"v(\d+)", str(v.get("version"))))]
            first = max(numbers, default=0) + 1
            versions = [f"v{n}" for n in range(first, first + MAX_CLAIMS)]
        for candidate in versions:
            adapter_id = f"{name}-{candidate}"
            if adapter_id in aliases:
                raise StoreError(f"{adapter_id} is an alias name in {self.uri}")
            if adapter_id in index and version is not None:
                raise StoreError(f"{adapter_id} is already published in {self.uri}; choose another --version")
            published = {"adapter_id": adapter_id, "name": name, "version": candidate,
                         "published_at": time.time(), "source": source, "by": _writer()}
            if adapter_id not in index and cas.create(self._uri(adapter_id, MANIFEST),
                                                      _dumps({**manifest, "published": published}), **self._kw):
                return adapter_id, published
            if version is not None:
                raise StoreError(f"{adapter_id} is already published (or being published) in {self.uri}; "
                                 "choose another --version")
        raise StoreError(f"no free version for {name!r} in {self.uri} after {MAX_CLAIMS} tries")

    def manifest(self, adapter_id: str) -> dict[str, Any]:
        return json.loads(storage.read_text(self._uri(adapter_id, MANIFEST), **self._kw))

    def download(self, adapter_id: str, local_dir: str | Path) -> Path:
        if adapter_id not in self.adapter_ids():
            raise StoreError(f"adapter {adapter_id!r} is not in {self.uri} (published: {self.adapter_ids()})")
        return storage.download_dir(self.adapter_uri(adapter_id), local_dir, **self._kw)

    # -- aliases -------------------------------------------------------------------------------

    def aliases(self) -> dict[str, Alias]:
        source = self._uri(ALIASES)
        return {k: Alias.from_record(k, v, source) for k, v in self._read_json(ALIASES, {}).items()}

    def alias_history(self, alias: str) -> list[dict[str, Any]]:
        """Every change of ``alias`` (``alias-history-<alias>.jsonl``), by revision."""
        data = cas.read(self._uri(f"alias-history-{alias}.jsonl"), **self._kw).data or b""
        return sorted((json.loads(line) for line in data.decode().splitlines() if line.strip()),
                      key=lambda r: r["revision"])

    def set_alias(self, alias: str, *, stable: str, candidate: str | None = None,
                  candidate_weight: float = 0.0, expected_revision: int | None = None) -> Alias:
        """Create or update an alias (compare-and-swap; the revision increases by one). With
        ``expected_revision``, raise :class:`AliasConflict` unless the alias is still at it (0: absent)."""
        _check_name("alias", alias)
        if not 0.0 <= candidate_weight <= 1.0:
            raise StoreError(f"alias {alias!r}: candidate_weight {candidate_weight} is not in [0, 1]")
        if candidate is None and candidate_weight:
            raise StoreError(f"alias {alias!r}: candidate_weight {candidate_weight} without a candidate")
        return self._write_alias(alias, lambda _: (stable, candidate, float(candidate_weight)),
                                 expected_revision=expected_revision)

    def _write_alias(self, alias: str, decide: Callable[[Alias | None], tuple[str, str | None, float]], *,
                     expected_revision: int | None = None, reason: str | None = None) -> Alias:
        """One alias change: ``decide(current record)`` gives (stable, candidate, weight); it is
        re-run on the fresh record whenever another writer got in first."""
        _check_name("alias", alias)
        index = self.index()
        if alias in index:
            raise StoreError(f"alias {alias!r} collides with a published adapter id")
        done: dict[str, Any] = {}

        def change(records: dict[str, Any]) -> dict[str, Any]:
            current = Alias.from_record(alias, records[alias], self._uri(ALIASES)) if alias in records else None
            revision = current.revision if current else 0
            if expected_revision is not None and revision != expected_revision:
                raise AliasConflict(f"alias {alias!r} is at revision {revision}, not {expected_revision}: "
                                    "changed by another writer")
            stable, candidate, weight = decide(current)
            for role, target in (("stable", stable), ("candidate", candidate)):
                if target is not None and target not in index:
                    raise StoreError(f"alias {alias!r}: {role} {target!r} is not a published adapter in {self.uri}")
            record = Alias(stable=stable, candidate=candidate, candidate_weight=weight, revision=revision + 1)
            records[alias] = record.to_dict()
            done.update(record=record, previous=current)
            return records

        self._update_json(ALIASES, {}, change)
        record, previous = done["record"], done["previous"]
        entry = {"alias": alias, "revision": record.revision, "record": record.to_dict(),
                 "previous": previous.to_dict() if previous else None, "by": _writer(), "reason": reason}
        if previous and previous.unknown:  # what a newer version wrote and this one dropped
            entry["dropped_fields"] = sorted(previous.unknown)
        try:
            self._append_jsonl(f"alias-history-{alias}.jsonl", entry)
        except StoreError as exc:
            raise StoreError(f"alias {alias!r} is now at revision {record.revision} but its history was not "
                             f"recorded: {exc}") from None
        return record

    # -- resolution ----------------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """An adapter id for ``ref``: an id, ``latest``, ``<name>:latest`` or an alias (its stable
        version). The same rule serves batch (`--adapter`) and the serving ingress."""
        if ref == "latest":
            return self.latest()
        if ref.endswith(":latest"):
            return self.latest(ref.removesuffix(":latest"))
        aliases = self.aliases()
        if ref in aliases:
            return aliases[ref].stable
        if ref in self.index() or ref in self.adapter_ids():
            return ref
        raise StoreError(f"unknown adapter {ref!r} in {self.uri}: published {sorted(self.index())}, "
                         f"aliases {sorted(aliases)}")


# -- training runs -----------------------------------------------------------------------------


def find_training_adapter(config: PipelineConfig, ref: str) -> tuple[Path, dict[str, Any]]:
    """A trained adapter folder and its run manifest for a folder, a run id or ``latest``
    (the training stage's rule: newest completed ``finished_at``, never mtimes)."""
    from e2e_llm.runs import AdapterNotFound, resolve_adapter

    try:
        path, manifest = resolve_adapter(config, ref)
    except AdapterNotFound as exc:
        raise StoreError(str(exc)) from None
    return path, manifest or {}


def fetch_adapter(config: PipelineConfig, ref: str, local_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Resolve ``ref`` in the adapter store (id, ``latest``, ``<name>:latest`` or alias) and
    download it to ``local_dir`` -- the batch stage's view of what serving calls ``ref``."""
    store = AdapterStore.from_config(config)
    adapter_id = store.resolve(ref)
    path = store.download(adapter_id, Path(local_dir) / adapter_id)
    manifest_file = path / MANIFEST
    return path, json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}


def local_store_address(config: PipelineConfig) -> tuple[str, int, Path]:
    """Host, port and folder of ``config``'s local adapter store, as ``e2e-llm serve`` starts it."""
    from urllib.parse import urlparse

    from e2e_llm.local_s3 import is_loopback

    endpoint = storage.s3_endpoint(config.storage.endpoint_url)
    if not endpoint or not is_loopback(endpoint):
        raise StoreError(f"{config.source_file}: the adapter store's S3 endpoint ({endpoint or 'the provider'}) "
                         "is not on loopback: no local store to run")
    url = urlparse(endpoint)
    return url.hostname, url.port or 80, local_store_dir(config)


def local_store_dir(config: PipelineConfig) -> Path:
    """Where the local S3 server keeps its objects: ``<storage root>/s3`` (local roots only)."""
    root = config.storage.root
    if "://" in root and not root.startswith("file://"):
        raise StoreError(f"storage.root {root} is remote: a local S3 server has no local folder for it")
    return config.path(root.removeprefix("file://")) / "s3"
