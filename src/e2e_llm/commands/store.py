# SPDX-License-Identifier: Apache-2.0
"""Run a profile's local adapter store in the foreground: the S3 server (moto) on the profile's
loopback endpoint, its objects kept in <storage root>/s3, as `e2e-llm serve` starts it. Each
request is logged; Ctrl-C stops it after saving the last writes.

Example:
    e2e-llm store --profile local     (make store)
"""

from __future__ import annotations

import argparse
import sys

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import load_profile
    from e2e_llm.local_s3 import serve
    from e2e_llm.store import StoreError, local_store_address

    try:
        host, port, data_dir = local_store_address(load_profile(args.profile))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    serve(host, port, data_dir)
    return 0
