# SPDX-License-Identifier: Apache-2.0
"""A local S3-compatible server (moto) on loopback: the local profile's adapter store and the
tests' object storage. Dev and test tooling, not part of the pipeline on a cluster.

Two properties the rest of the project relies on:
- **Atomic conditional writes.** Moto checks an ``If-Match``/``If-None-Match`` precondition and
  stores the object in two steps, so this server handles one mutating request at a time (reads
  stay concurrent): conditional writes are then as atomic as on S3 (:mod:`e2e_llm.cas`).
- **Data that survives a restart** (with ``--data-dir``). Moto keeps objects in memory only, so
  every bucket is mirrored to a folder (``<data dir>/<bucket>/<url-quoted key>``): restored
  before the server reports ready, re-synced every ``SYNC_S`` seconds and once more on
  SIGINT/SIGTERM/SIGHUP. A crash loses at most the last second of writes; a clean stop loses nothing.

Usage:
    e2e-llm store --profile local     (make store: the profile's endpoint, kept in <storage root>/s3)
    python -m e2e_llm.local_s3 -H 127.0.0.1 -p 9321 --data-dir /tmp/s3
:func:`start` runs it in the background (``e2e-llm serve`` on the local profile, the tests).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

SYNC_S = 1.0
# The mirror's own requests carry this in their User-Agent and are not logged: in the foreground
# (`make store`) they would print two lines a second over the requests that matter.
MIRROR_AGENT = "e2e-llm-store-mirror"
# Not an S3 path (no bucket may start with "_"): where the server says which store it keeps.
INFO_PATH = "/_e2e-llm/store"
READY = "e2e-llm local S3 ready"


class LocalS3Error(RuntimeError):
    pass


def is_loopback(endpoint: str) -> bool:
    from e2e_llm.ports import LOOPBACK_NAMES

    return urlparse(endpoint).hostname in LOOPBACK_NAMES


def endpoint_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """Whether a server listens at ``endpoint``. A TCP connect, not a request: the kernel accepts
    on a listening socket however busy the server is (an HTTP request with a 1 s timeout called a
    running store missing on a loaded machine); a refused connect means nothing listens."""
    import socket

    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def local_credentials() -> None:
    """Dummy credentials for a loopback S3 server (boto3/pyarrow refuse to sign without any)."""
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)


def require_reachable(endpoint: str | None, what: str) -> None:
    """A clear error when ``what`` lives on a loopback S3 server that is not running."""
    if endpoint and is_loopback(endpoint):
        local_credentials()
        if not endpoint_reachable(endpoint):
            raise LocalS3Error(f"no S3 server at {endpoint} for {what}: start one with `make store` "
                               "(PROFILE=... for another profile's), or let `e2e-llm serve --publish ...` start it")


# -- the server process -----------------------------------------------------------------------


def serialized_writes(app):
    """WSGI middleware: one mutating request at a time, so moto's precondition check and its
    write cannot interleave with another writer's."""
    lock = threading.Lock()

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD", "OPTIONS"):
            return app(environ, start_response)
        with lock:
            return list(app(environ, start_response))

    return wrapped


def with_store_info(app, data_dir: Path | None):
    """WSGI middleware: ``GET INFO_PATH`` says where this server keeps its objects, so a second
    pipeline whose profile names the same endpoint can tell another profile's store from its own."""
    import json

    body = json.dumps({"data_dir": str(data_dir.resolve()) if data_dir is not None else None}).encode()

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == INFO_PATH and environ.get("REQUEST_METHOD") == "GET":
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return wrapped


def running_store(endpoint: str, timeout: float = 5.0) -> dict | None:
    """What the e2e-llm store at ``endpoint`` says of itself; None for another S3 server or one too
    busy to answer (nothing to compare then)."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(endpoint.rstrip("/") + INFO_PATH, timeout=timeout) as response:
            info = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "data_dir" in info else None


def _client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=Config(user_agent_extra=MIRROR_AGENT))


def _request_handler():
    """moto's request handler, silent for the mirror's own requests."""
    from moto.server import MotoRequestHandler

    class Handler(MotoRequestHandler):
        def log_request(self, *args, **kwargs):
            if MIRROR_AGENT not in self.headers.get("User-Agent", ""):
                super().log_request(*args, **kwargs)

    return Handler


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


def serve(host: str, port: int, data_dir: Path | None = None) -> None:
    """Run the server in the foreground (moto's own app and request handler, as ``moto_server``),
    mirrored to ``data_dir`` when given; prints ``READY`` once it answers."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from e2e_llm.hangup import on_stop_signals

    os.environ.setdefault("MOTO_PORT", str(port))  # as moto_server does (URLs it generates)
    app = with_store_info(serialized_writes(DomainDispatcherApplication(create_backend_app)), data_dir)
    server = make_server(host, port, app, threaded=True, request_handler=_request_handler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    on_stop_signals(lambda *_: stop.set())  # a hangup of `make store`'s terminal too: its data mirrored first
    s3, seen, restored = None, {}, 0
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        s3 = _client(f"http://{host}:{port}")
        restored = restore(s3, data_dir)
        sync(s3, data_dir, seen)
    kept = f", {restored} objects restored from {data_dir}" if data_dir is not None else " (in memory)"
    print(f"{READY}: http://{host}:{port}{kept}", flush=True)
    try:
        while not stop.wait(SYNC_S):
            if s3 is not None:
                try:
                    sync(s3, data_dir, seen)
                except Exception as exc:  # noqa: BLE001  a sync racing a write: next round
                    print(f"local S3: sync failed ({exc}); retrying", file=sys.stderr, flush=True)
    finally:
        if s3 is not None:
            sync(s3, data_dir, seen)
        server.shutdown()


class LocalS3Process:
    """The server as a child process: :meth:`start` returns once it has restored its data and
    answers; :meth:`stop` ends it cleanly (its data is mirrored first)."""

    def __init__(self, host: str, port: int, data_dir: str | Path | None = None, python: str = sys.executable):
        self.host, self.port, self.python = host, port, python
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 60.0) -> LocalS3Process:
        src = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        cmd = [self.python, "-m", "e2e_llm.local_s3", "-H", self.host, "-p", str(self.port)]
        if self.data_dir is not None:
            cmd += ["--data-dir", str(self.data_dir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     start_new_session=True)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith(READY):
            code = self.proc.poll()
            self.stop()
            raise LocalS3Error(f"the local S3 server on {self.endpoint} did not start (exit {code}; port in use? "
                               "moto is in the serve environment)")
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

    # Popen-like, for callers that hold it as a process
    def terminate(self) -> None:
        self.stop()

    def wait(self, timeout: float | None = None) -> int | None:
        self.stop(timeout or 30.0)
        return self.proc.returncode if self.proc else None


def start(endpoint: str, *, data_dir: str | Path | None = None, python: str | None = None,
          timeout: float = 60.0) -> LocalS3Process | None:
    """Start the server on the loopback endpoint's port (``python``: the interpreter, default this
    one; ``data_dir``: where its contents are kept across restarts) and wait until it answers.
    Returns the process (the caller stops it), or None if one already answers there. One that
    keeps another store (another profile on the same endpoint, or one in memory) is an error:
    this profile's adapters would be written into it."""
    if not is_loopback(endpoint):
        raise LocalS3Error(f"{endpoint}: only a loopback endpoint can be started locally")
    local_credentials()
    if endpoint_reachable(endpoint):
        wanted = str(Path(data_dir).resolve()) if data_dir is not None else None
        if (info := running_store(endpoint)) is not None and info["data_dir"] != wanted:
            raise LocalS3Error(
                f"the S3 server at {endpoint} keeps another store ({info['data_dir'] or 'in memory'}), not "
                f"this profile's ({wanted or 'in memory'}): stop it, or give this profile a port of its own "
                "in storage.endpoint_url")
        return None
    url = urlparse(endpoint)
    return LocalS3Process(url.hostname, url.port or 80, data_dir, python or sys.executable).start(timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e_llm.local_s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=9321)
    parser.add_argument("--data-dir", type=Path, help="keep the contents here across restarts (default: memory)")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.data_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
