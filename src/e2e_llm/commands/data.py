# SPDX-License-Identifier: Apache-2.0
"""Fetch the profile's split files, validate every row against the task schema, and write
clean alpaca JSONL, rejects.jsonl and LLaMA-Factory's dataset_info.json under
<storage>/data/<dataset>/. Prints rows in = clean + rejected per split.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from e2e_llm.cli import add_profile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_profile_argument(parser)
    parser.add_argument("--source", help="directory or http(s) base URL overriding data.source")
    parser.add_argument("--output", help="output directory (default: <storage>/data/<dataset>)")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from e2e_llm import storage
    from e2e_llm.config import load_profile
    from e2e_llm.data import IngestError, ingest

    config = load_profile(args.profile)
    source = args.source or config.data.source
    if not source.startswith(("http://", "https://")):
        source = str(config.path(source))
        if not Path(source).is_dir():  # e.g. a clone without ../shared beside it
            where = "--source" if args.source else f"data.source in {config.source_file}"
            print(f"error: {source} ({where}) is not a folder: point it at a folder or an http(s) base URL "
                  f"holding {', '.join(config.data.splits.values())}", file=sys.stderr)
            return 1
    output_uri = args.output or config.storage_uri("data", config.data.dataset)
    remote = storage.is_remote(output_uri)
    with contextlib.ExitStack() as stack:
        # Object storage: build in a temporary folder (removed after), then upload the finished folder.
        output = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="e2e-data-"))) if remote \
            else Path(output_uri)
        try:
            report = ingest(
                source=source,
                splits=config.data.splits,
                output_dir=output,
                task=config.task_schema(),
                dataset=config.data.dataset,
                fmt=config.data.format,
                required=config.data.required_splits,
                system_prompt=config.data.system_prompt,
            )
        except IngestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if remote:
            storage.upload_dir(output, output_uri, endpoint_url=config.storage.endpoint_url,
                               region=config.storage.region)
    print(report.table())
    if report.system_prompt:
        print(f"instruction of every row replaced by data.system_prompt: {report.system_prompt!r}")
    print(f"rows in {report.rows_in} = clean {report.rows_in - report.rows_rejected} + rejected "
          f"{report.rows_rejected}; written to {output_uri}")
    return 0
