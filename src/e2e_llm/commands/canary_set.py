# SPDX-License-Identifier: Apache-2.0
"""Make the canary set: a deterministic, function-stratified sample of the profile's clean
validation rows, written as JSONL (default configs/canary/<dataset>-<version>.jsonl). Prints the
`canary_set:` block (sha256, rows, longest reference in base-model tokens) for configs/canary.yaml.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--rows", type=int, default=24, help="rows in the set (at most a few dozen; default 24)")
    parser.add_argument("--version", default="v1", help="version name recorded in the policy (default v1)")
    parser.add_argument("--split", default="val", help="clean split to sample (default val)")
    parser.add_argument("--output", help="output JSONL (default configs/canary/<dataset>-<version>.jsonl)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from e2e_llm.canary import write_canary_set
    from e2e_llm.config import load_profile
    from e2e_llm.data import read_jsonl
    from e2e_llm.model import resolve_model_path
    from e2e_llm.model_mirror import loadable

    config = load_profile(args.profile)
    split = config.storage_uri("data", config.data.dataset, f"{args.split}.jsonl")  # local or object storage
    try:
        rows = read_jsonl(split, **config.storage_kw())
    except FileNotFoundError:
        print(f"error: {split} not found: run `e2e-llm data --profile {args.profile}` first", file=sys.stderr)
        return 1
    model = loadable(resolve_model_path(config.model, root=config.root), config.object_store_kw(), weights=False)
    tokenizer = AutoTokenizer.from_pretrained(model)
    output = Path(args.output) if args.output else config.root / "configs" / "canary" / \
        f"{config.data.dataset}-{args.version}.jsonl"
    spec = write_canary_set(rows, config.task_schema(), args.rows, output, args.version,
                            lambda text: len(tokenizer(text + tokenizer.eos_token)["input_ids"]))
    if output.resolve().is_relative_to(config.root.resolve()):
        spec["path"] = str(output.resolve().relative_to(config.root.resolve()))
    print(yaml.safe_dump({"canary_set": spec}, sort_keys=False), end="")
    return 0
