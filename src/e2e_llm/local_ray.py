# SPDX-License-Identifier: Apache-2.0
"""What a caller that starts Ray itself to serve a profile does around ``ray.init`` (``e2e-llm
serve``, bench/serve_latency.py, the integration tests' app).

Ray's processes read some settings only from their environment, when they start, and inherit
it from the process that calls ``ray.init``: Serve's high-throughput mode
(:func:`e2e_llm.serve.serve_mode_env`) and the CPUs the engine may use
(:func:`e2e_llm.cpu_pinning.engine_cpus_env`). :class:`LocalRay` puts them in ``os.environ`` on
entry and restores it on exit, and records the processes the caller already had, so that
:meth:`LocalRay.pin` (once the app is up) moves only Ray's off the engine's CPUs, with the threads
Ray started in this process.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from e2e_llm.cpu_pinning import (
    ENGINE_CPUS_ENV,
    Pinning,
    descendant_pids,
    engine_cpus_env,
    move_own_threads,
    own_threads,
    pin_off_engine,
)
from e2e_llm.serve import serve_mode_env


class LocalRay:
    """Enter before ``ray.init``; :meth:`pin` once the app is up; exit after ``ray.shutdown``."""

    def __init__(self, config: Any):
        self.env = {**serve_mode_env(config, local=True), **engine_cpus_env(config)}
        self.root_pid = os.getpid()
        self.before: set[int] = set()  # the caller's processes before Ray's
        self.threads_before: set[int] = set()  # and this process's threads
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> LocalRay:
        self.before = descendant_pids(self.root_pid)
        self.threads_before = own_threads()
        self._saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        return self

    def pin(self) -> Pinning | None:
        """:func:`~e2e_llm.cpu_pinning.pin_off_engine` for the processes started since entering,
        and the threads started in this process since then (Ray's driver threads) but the calling
        one onto the same CPUs. None when
        ``serve.isolate_engine_cpus`` is off or there is nothing to split."""
        if ENGINE_CPUS_ENV not in self.env:
            return None
        pinning = pin_off_engine(self.root_pid, leave=self.before)
        if pinning is None:
            return None
        return replace(pinning, driver_threads=move_own_threads(pinning.ray_cpus, leave=self.threads_before))

    def __exit__(self, *exc) -> None:
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
