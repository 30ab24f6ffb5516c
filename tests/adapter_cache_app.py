# SPDX-License-Identifier: Apache-2.0
"""A serving app of its own (tests/serving.py's running_app) with room for one adapter in vLLM and
one version on disk, asked for two adapters in turn: each request for one evicts the other from
the engine and prunes it from disk, so the engine reloads it from a folder that had been removed.
Run in a process of its own by tests/integration/test_serve_adapter_cache.py (the session's shared
app holds this process's Ray); prints one JSON line per request."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adapters import make_lora_adapter
from serving import running_app

from e2e_llm.config import load_profile
from e2e_llm.server import lora_cache_dir

PROMPT = "Name a game by Blizzard North."


def main(root: str, model_dir: str, s3_endpoint: str, work: str) -> None:
    config = load_profile("local", root=Path(root))
    config.serve.max_num_adapters_per_replica = 1
    config.serve.adapter_cache.max_versions = 1
    config.serve.adapter_cache.min_idle_s = 0
    adapters = {"identity": make_lora_adapter(Path(model_dir), Path(work) / "identity"),
                "damaged": make_lora_adapter(Path(model_dir), Path(work) / "damaged", damaged=True)}
    with running_app(config, Path(model_dir), s3_endpoint, adapters) as app:
        cache = Path(lora_cache_dir(app.config.adapters_uri(), s3_endpoint))
        client = app.client(timeout=300)
        for role in ("identity", "damaged", "identity", "damaged", "identity"):
            answer = client.chat.completions.create(
                model=f"{app.model_id}:{app.adapters[role]}", temperature=0, max_tokens=12,
                messages=[{"role": "user", "content": PROMPT}]).choices[0].message.content
            on_disk = sorted(p.name for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
            print(json.dumps({"role": role, "answer": answer, "on_disk": on_disk}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
