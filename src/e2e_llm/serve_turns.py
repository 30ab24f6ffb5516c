# SPDX-License-Identifier: Apache-2.0
"""One ``make e2e`` serve stage at a time on a host:port of this machine.

Two pipelines of one profile started together (two terminals, two CI jobs on one runner) train
and score side by side, then both serve on the profile's port: the second serve stage found the
first's app there and failed, 13 minutes in. The serve stage is short (one app, one request,
shutdown), so the second waits its turn instead. The turn is an advisory lock (``flock``) on a
file in the temp dir named after the host and port, released by the kernel when its holder
exits, however it exits; the holder writes its run id and pid there for the one that waits.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from e2e_llm.ports import port_taken


def turn_file(host: str, port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"e2e-llm-serve-{re.sub(r'[^A-Za-z0-9.-]', '_', host)}-{port}.lock"


def holder(host: str, port: int) -> str | None:
    """Who has the serve turn on ``host:port`` now ("e2e <run id> (pid N)"), or None when nobody."""
    path = turn_file(host, port)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(path)
    finally:
        os.close(fd)  # a shared lock taken here goes with it
    return None


@contextmanager
def serve_turn(host: str, port: int, run_id: str, echo: Callable[[str], None] = print,
               release_s: float = 60.0) -> Iterator[None]:
    """Hold the serve turn on ``host:port`` for the block, waiting (Ctrl-C stops the wait) while
    another pipeline's serve stage has it, then up to ``release_s`` for its server's last process
    to let go of the port (Ray's stop in the background after its driver has gone)."""
    path = turn_file(host, port)
    try:
        fd, writable = os.open(path, os.O_RDWR | os.O_CREAT, 0o666), True
    except PermissionError:  # another user's file: a read-only descriptor takes the lock as well
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"waiting for {_describe(path) or 'another pipeline'} to finish its serve stage on {host}:{port}")
            fcntl.flock(fd, fcntl.LOCK_EX)
            deadline = time.monotonic() + release_s
            while port_taken(host, port) and time.monotonic() < deadline:
                time.sleep(0.5)
        if writable:
            os.ftruncate(fd, 0)
            os.write(fd, f"e2e {run_id} (pid {os.getpid()})".encode())
        yield
    finally:
        os.close(fd)


def _describe(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
