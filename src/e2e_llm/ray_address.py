# SPDX-License-Identifier: Apache-2.0
"""The Ray cluster a command joins: ``$RAY_ADDRESS`` when set (a job on a cluster, or one started by
hand), else an instance the command starts on this machine. A ``$RAY_ADDRESS`` left over from other
work, where nothing listens any more, made ``ray.init`` retry for minutes, printing only GCS
warnings; :func:`unreachable_ray_address` says so at once."""

from __future__ import annotations

import os
import shlex
import socket
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

RAY_ADDRESS_ENV = "RAY_ADDRESS"


def unreachable_ray_address(environ: Mapping[str, str] | None = None, timeout: float = 5.0) -> str | None:
    """Why ``$RAY_ADDRESS`` cannot be joined (nothing listens at its host and port), or None: unset,
    ``auto``/``local`` (Ray's own lookups), a form this check does not read, or something listens."""
    address = (os.environ if environ is None else environ).get(RAY_ADDRESS_ENV, "").strip()
    if address in ("", "auto", "local"):
        return None
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return None  # Ray says what it makes of it
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return (f"${RAY_ADDRESS_ENV}={address}: no Ray cluster listens there ({exc.strerror or exc}); unset it to "
                "run on a Ray instance of this machine, or start that cluster")


def own_instance_runtime_env() -> dict[str, str]:
    """What a Ray instance this process starts on this machine needs in its job ``runtime_env`` for
    its workers to start at all. Ray starts a worker whose job or actor has a runtime_env (every
    e2e-llm stage's has) as ``bash -c "exec <python> <args>"``, quoting the arguments but not the
    interpreter's path: from a checkout whose path has a space (``/mnt/c/Users/Jane Doe/...`` on
    WSL) every worker died at start ("bash: line 1: /mnt/c/Users/Jane: No such file or directory",
    in the raylet's log only) and the stage waited for ever. Ray documents ``py_executable`` as the
    command that starts workers, so the path goes there, shell-quoted; Serve's replicas and Ray
    Data's and Ray Train's actors inherit the job's. Nothing where the path needs no quoting."""
    quoted = shlex.quote(sys.executable)
    return {} if quoted == sys.executable else {"py_executable": quoted}


def name_own_instance() -> None:
    """In a process of a Ray instance (a worker or actor): ``$RAY_ADDRESS`` = that instance's GCS,
    unless set. Ray's State API called without an address (Ray Train's PlacementGroupCleaner does,
    every few seconds) otherwise looks for Ray instances among the machine's processes, and where
    another one runs (a second pipeline, an ``e2e-llm serve``) fails with "Found multiple active Ray
    instances": its thread died with that traceback on the terminal, and the cleaner with it."""
    import ray

    os.environ.setdefault(RAY_ADDRESS_ENV, ray.get_runtime_context().gcs_address)


def on_every_node(fn, *args, timeout_s: float = 120.0) -> dict[str, object] | None:
    """``fn(*args)`` run once on each alive node of the connected Ray cluster, as a task that takes
    no CPU (it runs beside a busy worker group): its result by node id, or None where some node did
    not answer within ``timeout_s``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(*args)
            for node in nodes]
    try:
        return dict(zip(nodes, ray.get(refs, timeout=timeout_s), strict=True))
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):  # a node gone or not answering
        for ref in refs:
            ray.cancel(ref, force=True)
        return None


def nodes_not_seeing(folder: str, timeout_s: float = 120.0) -> list[str]:
    """The alive nodes of the connected Ray cluster on which a file just written into the local
    ``folder`` is not there (their node ids): a folder on this machine's disk, or another machine's
    folder of the same path, rather than one filesystem shared by every node."""
    import ray

    if sum(node["Alive"] for node in ray.nodes()) < 2:
        return []
    probe = Path(folder) / f".e2e-llm-shared-{uuid.uuid4().hex}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("written by the driver\n")
    try:
        seen = on_every_node(os.path.exists, str(probe), timeout_s=timeout_s)
    finally:
        probe.unlink(missing_ok=True)
    return [node for node, there in (seen or {}).items() if not there]  # no answer: no way to tell; training goes on
