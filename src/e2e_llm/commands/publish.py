# SPDX-License-Identifier: Apache-2.0
"""Publish a trained LoRA adapter (and its run manifest) to the adapter store, as
``<store>/<name>-<version>/``, index it, and optionally point an alias at it.

Examples:
    e2e-llm publish --profile local --adapter latest --alias viggo
    e2e-llm publish --profile cluster --adapter <run id> --version v7
    e2e-llm publish --profile local --list
"""

from __future__ import annotations

import argparse
import json
import sys

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--adapter", help="adapter folder, training run id, or 'latest' (newest finished run)")
    parser.add_argument("--name", help="adapter name (default: data.dataset, e.g. viggo)")
    parser.add_argument("--version", help="version label (default: next vN for the name)")
    parser.add_argument("--alias", help="create the alias or move its stable version to this adapter")
    parser.add_argument("--list", action="store_true", help="print the versions index and aliases, publish nothing")


def run(args: argparse.Namespace) -> int:
    from e2e_llm.adapters import AdapterError
    from e2e_llm.config import load_profile
    from e2e_llm.publish import publish_new
    from e2e_llm.store import AdapterStore, StoreError, find_training_adapter

    config = load_profile(args.profile)
    store = AdapterStore.from_config(config)
    if not args.list and not args.adapter:
        print("error: --adapter is required (a folder, a run id or 'latest')", file=sys.stderr)
        return 2
    try:
        if not args.list:  # what is to be published first: a wrong --adapter is the user's first error
            adapter_dir, manifest = find_training_adapter(config, args.adapter)
        store.require_reachable()
        if args.list:
            print(json.dumps({"store": store.uri, "versions": store.versions(),
                              "aliases": {k: v.to_dict() for k, v in store.aliases().items()}}, indent=2))
            return 0
        adapter_id = publish_new(config, store, adapter_dir, manifest, name=args.name, version=args.version,
                                 alias=args.alias)
    except (StoreError, AdapterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"published {adapter_dir} as {adapter_id} at {store.adapter_uri(adapter_id)}")
    if args.alias:
        print(f"alias {args.alias} -> {store.aliases()[args.alias].to_dict()}")
    print(f"call it as model=\"{config.model.id}:{args.alias or adapter_id}\"")
    return 0
