# SPDX-License-Identifier: Apache-2.0
"""Known-noise log records, dropped by a logging filter in Ray's worker processes.

Installed with Ray's public ``runtime_env={"worker_process_setup_hook": ...}`` (see
:func:`e2e_llm.train.worker_env`), so it runs in every worker and actor of the job before
they log. Each entry says why the record is noise; anything not listed here, errors
included, still reaches the driver's terminal.
"""

from __future__ import annotations

import logging

# logger name -> message prefixes dropped (each with the reason it is noise)
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    # Ray Train v2's PlacementGroupCleaner polls the controller through the State API; on a busy
    # 2-core machine the poll times out and it logs this warning, then simply polls again
    # (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py). One run printed
    # it 519 times; the training itself is unaffected.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",
    ),
}


class DropKnownNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Ray worker setup hook: attach the filters (idempotent)."""
    for name, prefixes in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(prefixes))
