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

The JSON files sit beside the adapter folders (Ray lists only sub-folders as adapters).
Batch and serve resolve a reference the same way everywhere (:meth:`AdapterStore.resolve`):
an adapter id, ``latest`` / ``<name>:latest`` (newest published version) or an alias (its
stable version). Writers are the publish command and the canary controller, one at a time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.config import PipelineConfig

INDEX = "index.json"
ALIASES = "aliases.json"
MANIFEST = "manifest.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


class StoreError(RuntimeError):
    pass


@dataclass
class Alias:
    """Traffic split of one alias: ``candidate_weight`` of requests go to the candidate."""

    stable: str
    candidate: str | None = None
    candidate_weight: float = 0.0
    revision: int = 0
    updated_at: float = field(default_factory=time.time)

    def pick(self, draw: float) -> str:
        """The version for a request, given a uniform draw in [0, 1)."""
        if self.candidate and draw < self.candidate_weight:
            return self.candidate
        return self.stable

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _base_model_id(manifest: dict[str, Any]) -> str | None:
    base = manifest.get("base_model")
    return base.get("id") if isinstance(base, dict) else base


def _check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value):
        raise StoreError(f"{kind} {value!r}: use letters, digits, '.', '_' or '-' (no ':' or '/')")
    return value


def runtime_endpoint(config_endpoint: str | None = None) -> str | None:
    """S3 endpoint: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when set (tests, a local server on a
    chosen port), else the profile's ``storage.endpoint_url``."""
    return next((os.environ[n] for n in ENDPOINT_ENV if os.environ.get(n)), None) or config_endpoint


class AdapterStore:
    def __init__(self, uri: str, endpoint_url: str | None = None, region: str | None = None):
        self.uri = uri.rstrip("/")
        self._kw: dict[str, Any] = {}
        if storage.is_remote(self.uri):
            self._kw = {"endpoint_url": runtime_endpoint(endpoint_url), "region": region}

    @classmethod
    def from_config(cls, config: PipelineConfig) -> AdapterStore:
        return cls(config.adapters_uri(), config.storage.endpoint_url, config.storage.region)

    # -- low level ---------------------------------------------------------------------------

    def _uri(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    def _read_json(self, name: str, default: Any) -> Any:
        try:
            return json.loads(storage.read_text(self._uri(name), **self._kw))
        except FileNotFoundError:
            return default
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
            fs.create_dir(bucket)
        self._bucket_ok = True

    def _write_json(self, name: str, value: Any) -> None:
        self._ensure_bucket()
        storage.write_text(self._uri(name), json.dumps(value, indent=2, sort_keys=True) + "\n", **self._kw)

    def adapter_uri(self, adapter_id: str) -> str:
        return self._uri(adapter_id)

    # -- versions ------------------------------------------------------------------------------

    def index(self) -> dict[str, dict[str, Any]]:
        return self._read_json(INDEX, {"adapters": {}})["adapters"]

    def adapter_ids(self) -> list[str]:
        """Adapter folders actually present in the store (what Ray Serve LLM can load)."""
        # .jsonl: the canary controller's rollout logs (rollouts-<alias>.jsonl) live here too.
        return [n for n in storage.list_dir(self.uri, **self._kw) if not n.endswith((".json", ".jsonl"))]

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

        ``version`` defaults to the next ``vN`` for ``name``. With ``alias``, a new alias is
        created pointing at it, or an existing alias's stable version is moved to it.
        Returns the adapter id.
        """
        if "://" in str(adapter_dir):  # a run in object storage: stage it locally first
            with tempfile.TemporaryDirectory() as tmp:
                local = storage.download_dir(str(adapter_dir), Path(tmp) / "adapter", **self._kw)
                return self.publish(local, name=name, version=version, alias=alias,
                                    manifest={**(manifest or {}), "adapter_uri": str(adapter_dir)}, max_rank=max_rank)
        adapter_dir = Path(adapter_dir)
        missing = [f for f in ADAPTER_FILES if not (adapter_dir / f).is_file()]
        if missing:
            raise StoreError(f"{adapter_dir}: not a LoRA adapter folder (missing {', '.join(missing)})")
        adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
        rank = int(adapter_config.get("r", 0))
        if max_rank is not None and rank > max_rank:
            raise StoreError(f"{adapter_dir}: LoRA rank {rank} exceeds the serving max_lora_rank {max_rank} "
                             "(derived from the training recipe's lora_rank)")
        _check_name("adapter name", name)
        index = self._read_json(INDEX, {"adapters": {}})
        own = [v for v in index["adapters"].values() if v.get("name") == name]
        if version is None:
            numbers = [int(m.group(1)) for v in own if (m := re.fullmatch(r"v(\d+)", str(v.get("version"))))]
            version = f"v{max(numbers, default=0) + 1}"
        _check_name("version", version)
        adapter_id = f"{name}-{version}"
        if adapter_id in index["adapters"]:
            raise StoreError(f"{adapter_id} is already published in {self.uri}; choose another --version")
        if adapter_id in self.aliases():
            raise StoreError(f"{adapter_id} is an alias name in {self.uri}")

        manifest = dict(manifest or {})
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / adapter_id
            staged.mkdir()
            for f in adapter_dir.iterdir():
                if f.is_file() and f.name != MANIFEST:
                    (staged / f.name).write_bytes(f.read_bytes())
            published = {"adapter_id": adapter_id, "name": name, "version": version,
                         "published_at": time.time(), "source": str(adapter_dir.resolve())}
            (staged / MANIFEST).write_text(json.dumps({**manifest, "published": published}, indent=2,
                                                      sort_keys=True, default=str) + "\n")
            self._ensure_bucket()
            storage.upload_dir(staged, self.adapter_uri(adapter_id), **self._kw)

        index["adapters"][adapter_id] = {
            "name": name,
            "version": version,
            "seq": max((v.get("seq", 0) for v in index["adapters"].values()), default=0) + 1,
            "rank": rank,
            "base_model": _base_model_id(manifest) or adapter_config.get("base_model_name_or_path"),
            "run_id": manifest.get("run_id"),
            "published_at": published["published_at"],
            "source": manifest.get("adapter_uri") or published["source"],
        }
        self._write_json(INDEX, index)
        if alias:
            current = self.aliases().get(alias)
            if current is None:
                self.set_alias(alias, stable=adapter_id)
            else:
                self.set_alias(alias, stable=adapter_id, candidate=current.candidate,
                               candidate_weight=current.candidate_weight)
        return adapter_id

    def manifest(self, adapter_id: str) -> dict[str, Any]:
        return json.loads(storage.read_text(self._uri(adapter_id, MANIFEST), **self._kw))

    def download(self, adapter_id: str, local_dir: str | Path) -> Path:
        if adapter_id not in self.adapter_ids():
            raise StoreError(f"adapter {adapter_id!r} is not in {self.uri} (published: {self.adapter_ids()})")
        return storage.download_dir(self.adapter_uri(adapter_id), local_dir, **self._kw)

    # -- aliases -------------------------------------------------------------------------------

    def aliases(self) -> dict[str, Alias]:
        return {k: Alias(**v) for k, v in self._read_json(ALIASES, {}).items()}

    def set_alias(self, alias: str, *, stable: str, candidate: str | None = None,
                  candidate_weight: float = 0.0) -> Alias:
        """Create or update an alias (one atomic object write; the revision increases by one)."""
        _check_name("alias", alias)
        if not 0.0 <= candidate_weight <= 1.0:
            raise StoreError(f"alias {alias!r}: candidate_weight {candidate_weight} is not in [0, 1]")
        if candidate is None and candidate_weight:
            raise StoreError(f"alias {alias!r}: candidate_weight {candidate_weight} without a candidate")
        index = self.index()
        for role, target in (("stable", stable), ("candidate", candidate)):
            if target is not None and target not in index:
                raise StoreError(f"alias {alias!r}: {role} {target!r} is not a published adapter in {self.uri}")
        if alias in index:
            raise StoreError(f"alias {alias!r} collides with a published adapter id")
        records = self._read_json(ALIASES, {})
        revision = records.get(alias, {}).get("revision", 0) + 1
        record = Alias(stable=stable, candidate=candidate, candidate_weight=float(candidate_weight),
                       revision=revision)
        records[alias] = record.to_dict()
        self._write_json(ALIASES, records)
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


# -- a local S3-compatible server for the local profile --------------------------------------


def is_loopback(endpoint: str) -> bool:
    from urllib.parse import urlparse

    return urlparse(endpoint).hostname in ("127.0.0.1", "localhost", "::1")


def endpoint_reachable(endpoint: str, timeout: float = 1.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(endpoint, timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def local_credentials() -> None:
    """Dummy credentials for a loopback S3 server (boto3/pyarrow refuse to sign without any)."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)


def local_store_dir(config: PipelineConfig) -> Path:
    """Where the local S3 server keeps its objects: ``<storage root>/s3`` (local roots only)."""
    root = config.storage.root
    if "://" in root and not root.startswith("file://"):
        raise StoreError(f"storage.root {root} is remote: a local S3 server has no local folder for it")
    return config.path(root.removeprefix("file://")) / "s3"


def start_local_server(endpoint: str, data_dir: str | Path):
    """Start the local store (:mod:`e2e_llm.local_store`: moto, contents mirrored to
    ``data_dir`` and restored from it) on the loopback endpoint's port and wait until it has
    restored and answers. Returns the process (the caller stops it), or None if one already runs."""
    from urllib.parse import urlparse

    from e2e_llm.local_store import LocalStoreProcess

    if not is_loopback(endpoint):
        raise StoreError(f"{endpoint}: only a loopback endpoint can be started locally")
    local_credentials()
    if endpoint_reachable(endpoint):
        return None
    url = urlparse(endpoint)
    try:
        return LocalStoreProcess(url.hostname, url.port or 80, data_dir).start()
    except RuntimeError as exc:
        raise StoreError(str(exc)) from None


def require_reachable(store: AdapterStore) -> None:
    """A clear error when the store's loopback S3 server is not running."""
    endpoint = store._kw.get("endpoint_url")
    if endpoint and is_loopback(endpoint):
        local_credentials()
        if not endpoint_reachable(endpoint):
            raise StoreError(f"no S3 server at {endpoint} for the adapter store {store.uri}: start one with "
                             "`make store` (or let `e2e-llm serve --publish ...` start it)")
