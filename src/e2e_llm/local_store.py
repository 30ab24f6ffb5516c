# SPDX-License-Identifier: Apache-2.0
"""The local profile's adapter store: an S3-compatible server (moto) on loopback whose contents
survive restarts.

moto keeps objects in memory only (its recorder replays every request ever made, reads
included). This process runs moto's ``ThreadedMotoServer`` and mirrors every bucket to a folder
(``<data dir>/<bucket>/<url-quoted key>``): restored before it reports ready, re-synced every
``SYNC_S`` seconds and once more on SIGINT/SIGTERM. A crash loses at most the last second of
writes; a clean stop loses nothing.

Usage:
    python -m e2e_llm.local_store --port 9321 --data-dir .e2e/local/s3
(``make store``; ``e2e-llm serve`` starts it when nothing answers on the profile's endpoint.)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote, unquote

SYNC_S = 1.0
READY = "e2e-llm local store ready"


def _client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def restore(s3, data_dir: Path) -> int:
    """Put every mirrored object back; returns how many."""
    count = 0
    for bucket_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        s3.create_bucket(Bucket=bucket_dir.name)
        for f in sorted(bucket_dir.iterdir()):
            if f.is_file() and not f.name.startswith(".tmp-"):
                s3.put_object(Bucket=bucket_dir.name, Key=unquote(f.name), Body=f.read_bytes())
                count += 1
    return count


def sync(s3, data_dir: Path, seen: dict[tuple[str, str], str]) -> None:
    """Mirror the server's buckets to ``data_dir`` (changed objects written, removed ones deleted)."""
    live: dict[tuple[str, str], str] = {}
    for bucket in s3.list_buckets().get("Buckets", []):
        name = bucket["Name"]
        (data_dir / name).mkdir(parents=True, exist_ok=True)
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                live[(name, obj["Key"])] = obj["ETag"]
    for (bucket, key), etag in live.items():
        if seen.get((bucket, key)) == etag:
            continue
        target = data_dir / bucket / quote(key, safe="")
        tmp = target.with_name(f".tmp-{target.name}")
        tmp.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        os.replace(tmp, target)
    for bucket, key in set(seen) - set(live):
        (data_dir / bucket / quote(key, safe="")).unlink(missing_ok=True)
    seen.clear()
    seen.update(live)


def serve(host: str, port: int, data_dir: Path) -> None:
    from moto.server import ThreadedMotoServer

    data_dir.mkdir(parents=True, exist_ok=True)
    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    s3 = _client(f"http://{host}:{port}")
    restored = restore(s3, data_dir)
    seen: dict[tuple[str, str], str] = {}
    sync(s3, data_dir, seen)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"{READY}: http://{host}:{port}, {restored} objects restored from {data_dir}", flush=True)
    try:
        while not stop.wait(SYNC_S):
            try:
                sync(s3, data_dir, seen)
            except Exception as exc:  # noqa: BLE001  a sync racing a write: next round
                print(f"local store: sync failed ({exc}); retrying", file=sys.stderr, flush=True)
    finally:
        sync(s3, data_dir, seen)
        server.stop()


class LocalStoreProcess:
    """The local store as a child process: :meth:`start` returns once it has restored its data
    and answers; :meth:`stop` ends it cleanly (its data is mirrored first)."""

    def __init__(self, host: str, port: int, data_dir: str | Path, python: str = sys.executable):
        self.host, self.port, self.data_dir, self.python = host, port, Path(data_dir), python
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> LocalStoreProcess:
        src = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [self.python, "-m", "e2e_llm.local_store", "--host", self.host, "--port", str(self.port),
             "--data-dir", str(self.data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith(READY):
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(f"local store on {self.endpoint} did not start (exit {code}; port in use?)")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    # Popen-like, for callers that held a moto_server process before
    def terminate(self) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> int | None:
        self.stop(timeout or 30.0)
        return self.proc.returncode if self.proc else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="where the store's objects are kept")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
