# SPDX-License-Identifier: Apache-2.0
"""A training job's processes find their own Ray instance while another runs on the machine.

Two pipelines at once (or `e2e-llm serve` beside `e2e-llm train`): Ray Train's
PlacementGroupCleaner calls Ray's State API without an address, which then looked for Ray
instances among the machine's processes and died with "Found multiple active Ray instances",
its traceback on the terminal. Real Ray, two local instances."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

SRC = str(Path(__file__).resolve().parents[2] / "src")

OTHER = textwrap.dedent("""
    import sys, ray
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
    print("up", flush=True)
    sys.stdin.read()  # until the test closes it; then ray.shutdown at exit
""")

PROBE = textwrap.dedent("""
    import os, sys, ray
    from e2e_llm.ray_address import own_instance_runtime_env
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1],
             runtime_env={"worker_process_setup_hook": "e2e_llm.train_worker.setup_process",
                          "env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}, **own_instance_runtime_env()})

    @ray.remote(num_cpus=0)
    def state_api_lookups():
        from ray.util.state import get_actor
        def lookup():
            try:
                get_actor("ffffffffffffffffffffffff01000000", timeout=5)
            except ConnectionError as exc:
                return f"ConnectionError: {exc}"
            except Exception as exc:  # no dashboard here: the State API itself does not answer
                return type(exc).__name__
            return "answered"
        own = os.environ.get("RAY_ADDRESS")
        os.environ.pop("RAY_ADDRESS", None)
        without = lookup()
        os.environ["RAY_ADDRESS"] = own or ""
        return own, without, lookup()

    own, without, with_own = ray.get(state_api_lookups.remote())
    print(repr((own == ray.get_runtime_context().gcs_address, without, with_own)), flush=True)
""")


def test_a_training_jobs_processes_name_their_own_ray_instance_beside_another():
    with tempfile.TemporaryDirectory(prefix="ray-two-", dir="/tmp") as short:  # Ray's socket paths are short
        _probe_beside_another(Path(short))


def _probe_beside_another(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("RAY_ADDRESS", None)
    other = subprocess.Popen([sys.executable, "-c", OTHER, str(tmp_path / "other")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert other.stdout.readline().strip() == "up"
        done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "probe")], capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        own_is_gcs, without, with_own = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307  our own repr
        assert own_is_gcs
        assert without.startswith("ConnectionError: Found multiple active Ray instances")  # what the cleaner met
        assert not with_own.startswith("ConnectionError"), with_own
    finally:
        other.stdin.close()
        deadline = time.monotonic() + 60
        while other.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if other.poll() is None:
            other.kill()
