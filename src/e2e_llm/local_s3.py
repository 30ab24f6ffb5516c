# SPDX-License-Identifier: Apache-2.0
"""A local S3-compatible server (moto) on loopback: the local profile's adapter store and the
tests' object storage. Dev and test tooling, not part of the pipeline on a cluster.

``python -m e2e_llm.local_s3 -H 127.0.0.1 -p 9321`` (``make store``) runs it in the foreground;
:func:`start` runs it in the background (``e2e-llm serve`` on the local profile, the tests).
Moto checks an ``If-Match``/``If-None-Match`` precondition and stores the object in two steps,
so this server handles one mutating request at a time (reads stay concurrent): conditional
writes are then as atomic as on S3, which the adapter store relies on (:mod:`e2e_llm.cas`).
Contents live in memory for as long as the process runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse


class LocalS3Error(RuntimeError):
    pass


def is_loopback(endpoint: str) -> bool:
    return urlparse(endpoint).hostname in ("127.0.0.1", "localhost", "::1")


def endpoint_reachable(endpoint: str, timeout: float = 1.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(endpoint, timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


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
            raise LocalS3Error(f"no S3 server at {endpoint} for {what}: start one with "
                               "`make store` (or let `e2e-llm serve --publish ...` start it)")


def start(endpoint: str, *, python: str | None = None, timeout: float = 30.0) -> subprocess.Popen | None:
    """Start the server on the loopback endpoint's port (``python``: the interpreter, default
    this one) and wait until it answers. Returns the process (the caller stops it, e.g.
    ``os.killpg(proc.pid, SIGTERM)``: it runs in its own session), or None if one already runs."""
    if not is_loopback(endpoint):
        raise LocalS3Error(f"{endpoint}: only a loopback endpoint can be started locally")
    local_credentials()
    if endpoint_reachable(endpoint):
        return None
    url = urlparse(endpoint)
    proc = subprocess.Popen([python or sys.executable, "-m", "e2e_llm.local_s3", "-H", url.hostname,
                             "-p", str(url.port or 80)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if endpoint_reachable(endpoint, timeout=0.5):
            return proc
        if proc.poll() is not None:
            raise LocalS3Error(f"the local S3 server exited with {proc.returncode} (port {url.port} in use? "
                               "moto is in the serve environment)")
        time.sleep(0.2)
    proc.terminate()
    raise LocalS3Error(f"the local S3 server did not answer on {endpoint} within {timeout:g}s")


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


def serve(host: str, port: int) -> None:
    """Run the server in the foreground (moto's own app and request handler, as ``moto_server``)."""
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    os.environ.setdefault("MOTO_PORT", str(port))  # as moto_server does (URLs it generates)
    app = serialized_writes(DomainDispatcherApplication(create_backend_app))
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e_llm.local_s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=9321)
    args = parser.parse_args(argv)
    serve(args.host, args.port)


if __name__ == "__main__":
    main()
