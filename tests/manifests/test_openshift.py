# SPDX-License-Identifier: Apache-2.0
"""The ``openshift`` component: the base's Ray pods as OpenShift's restricted-v2 SCC admits them
(it assigns uid, fsGroup and SELinux level from the namespace's ranges and refuses a pod that
names its own: the base's fsGroup 100 was refused). Checked offline against those rules; no
OpenShift cluster runs here."""

from __future__ import annotations

import copy
import shutil

import pytest
from conftest import ROOT
from manifest_cache import built, crd_dir, find

from e2e_llm.render_openshift import REQUIRED_SCC, REQUIRED_SCC_ANNOTATION
from e2e_llm.validate import kustomize_build, validate_documents
from e2e_llm.validate_common import pod_templates
from e2e_llm.validate_pod_security import check_openshift_pods

KINDS = ("RayJob", "RayService")


@pytest.fixture(scope="module")
def with_component(tmp_path_factory):
    """The prod overlay with the openshift component added, as a platform team would, built."""
    return _with_component(tmp_path_factory.mktemp("openshift"))


def _with_component(tmp_path, env: str = "prod"):
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s" / "overlays" / env
    text = (overlay / "kustomization.yaml").read_text()
    if "components:" not in text:
        text += "components:\n"
    text = text.replace("components:\n", "components:\n  - ../../components/openshift\n", 1)
    (overlay / "kustomization.yaml").write_text(text)
    return kustomize_build(overlay)


def _as_restricted_v2_wants(doc):
    """``doc`` changed by hand the way the component should: fsGroup dropped, the SCC named."""
    doc = copy.deepcopy(doc)
    for _, template in pod_templates(doc):
        template["spec"].get("securityContext", {}).pop("fsGroup", None)
        template.setdefault("metadata", {}).setdefault("annotations", {})[REQUIRED_SCC_ANNOTATION] = REQUIRED_SCC
    return doc


def test_the_component_drops_every_fsgroup_names_the_scc_and_changes_nothing_else(with_component):
    without = built()["prod"]
    assert [(d["kind"], d["metadata"]["name"]) for d in with_component] == \
        [(d["kind"], d["metadata"]["name"]) for d in without]
    templates = 0
    for plain, patched in zip(without, copy.deepcopy(with_component), strict=True):
        if plain["kind"] in KINDS:
            assert any("fsGroup" in t["spec"].get("securityContext", {}) for _, t in pod_templates(plain))
            assert patched == _as_restricted_v2_wants(plain), plain["metadata"]["name"]
            templates += len(list(pod_templates(patched)))
        else:
            assert patched == plain
    assert templates >= 8  # head, workers and submitter of both jobs; head and workers of the service


def test_the_built_overlay_passes_the_whole_ladder_and_the_scc_check(with_component):
    docs = copy.deepcopy(with_component)
    assert validate_documents(docs, crd_dir()) == []
    assert all(check_openshift_pods(d) == [] for d in docs if d["kind"] in KINDS)


def test_a_pod_restricted_v2_would_refuse_is_named():
    service = _as_restricted_v2_wants(find(built()["prod"], "RayService"))
    assert check_openshift_pods(service) == []
    assert check_openshift_pods(find(built()["prod"], "RayService")) == []  # not asking for the SCC: not checked
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    worker["spec"]["securityContext"]["fsGroup"] = 100
    worker["spec"]["containers"][0]["securityContext"]["runAsUser"] = 1000
    del service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["annotations"][
        REQUIRED_SCC_ANNOTATION]
    problems = check_openshift_pods(service)
    group = worker["spec"].get("groupName") or service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]
    assert any(f"worker pod of group {group}: spec.securityContext.fsGroup: restricted-v2 assigns it" in p
               for p in problems), problems
    assert any("spec.containers[ray-worker].securityContext.runAsUser: restricted-v2 assigns it" in p
               for p in problems), problems
    # KubeRay's wait-gcs-ready init container copies the Ray container's securityContext.
    assert any("spec.initContainers[wait-gcs-ready].securityContext.runAsUser" in p for p in problems), problems
    assert any("/spec/rayClusterConfig/headGroupSpec/template/metadata/annotations: openshift.io/required-scc is "
               "None" in p for p in problems), problems
