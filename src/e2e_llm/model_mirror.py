# SPDX-License-Identifier: Apache-2.0
"""A base model kept in object storage (``model.source: s3://...`` or ``gs://...``: a mirror of a
hub model for a cluster that cannot reach the hub) copied to the machine that loads it with
transformers: each training worker's node (LLaMA-Factory loads a local folder or a hub id, not a
URI), the training driver for its row checks and ``e2e-llm canary-set`` (the tokenizer alone),
the batch stage's driver for a merge, and the adapter checks of batch and publish (the config
alone: the shapes it allows). The engines (``ray.data.llm``, ``ray.serve.llm``) download such a
source themselves.

A copy is made once per machine and version of the files (:func:`e2e_llm.node_temp.fill_once`,
:func:`e2e_llm.storage.tree_version`) in this user's temp folder there; a newer version of the
same URI replaces it. It is read with the profile's object-store settings
(``PipelineConfig.object_store_kw``); credentials come from the machine's own environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from pathlib import Path
from typing import Any

from e2e_llm import storage
from e2e_llm.node_temp import fill_once, own_temp_dir

MODELS_DIR = "models"  # in this user's temp folder of the machine
# Files of a checkpoint that hold weights (the tokenizer and config need none of them).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")


class ModelMirrorError(RuntimeError):
    """The URI holds no files this process can read."""


def is_weights(relative_path: str) -> bool:
    return relative_path.lower().endswith(WEIGHT_SUFFIXES)


def local_copy(uri: str, fs_kw: dict[str, Any], weights: bool = True) -> Path:
    """The model at ``uri`` as a folder on this machine (without its weight files where ``weights``
    is false). The folder is named as the URI's last part, so the adapter trained from it names its
    base model so (``adapter_config.json``'s ``base_model_name_or_path``, which
    :func:`e2e_llm.adapters.check_fits_base` compares by that name)."""
    version = storage.tree_version(uri, **fs_kw)
    name = posixpath.basename(uri.rstrip("/"))
    key = hashlib.sha256(f"{uri.rstrip('/')}|{'all' if weights else 'no-weights'}".encode()).hexdigest()[:16]

    def fill(tmp: Path) -> None:
        with contextlib.suppress(FileNotFoundError):  # nothing there: said below
            storage.download_dir(uri, tmp / name, only=None if weights else (lambda path: not is_weights(path)),
                                 **fs_kw)
        if not (tmp / name / "config.json").is_file():
            raise ModelMirrorError(f"{uri}: no config.json there (model.source must be the folder of a "
                                   "transformers checkpoint, as `save_pretrained` or `hf download` writes it)")

    return fill_once(Path(own_temp_dir()) / MODELS_DIR / key, version, fill) / name


def loadable(model_path: str, fs_kw: dict[str, Any], weights: bool = True) -> str:
    """``model_path`` as transformers loads it: an object-store URI's local copy, anything else as
    it is (a local folder, a hub id)."""
    return str(local_copy(model_path, fs_kw, weights)) if storage.is_remote(model_path) else model_path
