# SPDX-License-Identifier: Apache-2.0
"""Artifacts shared by the manifest tests, built once per test process: the deploy config, a
fresh render, every overlay built with `kubectl kustomize`, and the whole ladder's report.
(Plain cached functions rather than fixtures so several test modules share one build.)"""

from __future__ import annotations

import copy
import functools

import pytest
from conftest import ROOT, SHARED

from e2e_llm.validate import KUBERAY_CRDS


@functools.cache
def crd_dir():
    path = SHARED / KUBERAY_CRDS
    if not (path / "ray.io_rayjobs.yaml").is_file():
        pytest.fail(f"KubeRay CRDs not found at {path} (../shared must sit beside the checkout)")
    return path


@functools.cache
def deploy():
    from e2e_llm.deploy import load_deploy

    return load_deploy(root=ROOT)


@functools.cache
def cluster_config():
    return deploy().pipeline()


@functools.cache
def rendered() -> dict[str, str]:
    from e2e_llm.render import render_files

    return render_files(deploy())


@functools.cache
def _built():
    from e2e_llm.validate import kustomize_build, overlays

    return {overlay.name: kustomize_build(overlay) for overlay in overlays(ROOT)}


def built() -> dict[str, list[dict]]:
    """env -> documents of `kubectl kustomize k8s/overlays/<env>` (a copy: tests may mutate)."""
    return copy.deepcopy(_built())


@functools.cache
def ladder_report() -> dict[str, list[str]]:
    from e2e_llm.validate import validate_all

    crd_dir()
    return validate_all(ROOT, SHARED)


def find(docs, kind, name=None):
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert matches, f"no {kind} {name or ''} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return copy.deepcopy(matches[0])
