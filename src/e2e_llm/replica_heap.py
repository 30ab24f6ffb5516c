# SPDX-License-Identifier: Apache-2.0
"""A serving replica's startup heap out of Python's garbage collector, as vLLM's own OpenAI server
does once it is up (``freeze_gc_heap`` in its lifespan), so the two run the same way.

Once vLLM, torch, transformers and Ray are imported a replica holds ~0.7 M objects. An
oldest-generation collection walks all of them -- 0.36-0.38 s on an AVX2-only CPU -- and stalls the
replica's event loop meanwhile: every stream it carries and every request on its way to the
engine. Frozen, they are skipped; one that dies later is still freed by reference counting, only
a reference cycle among them would stay (as under vLLM's server). Only inside a Serve replica,
which lives as long as the app: a test or notebook that constructs the class keeps its collector
as it is.
"""

from __future__ import annotations

import gc

from ray import serve
from ray.serve.exceptions import RayServeException


def freeze_startup_heap() -> int | None:
    """Collect once, then freeze every object alive; the number frozen, or None outside a replica."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return None
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
