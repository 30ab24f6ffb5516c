# SPDX-License-Identifier: Apache-2.0
"""The pods KubeRay creates from a RayJob/RayService, checked against the Kubernetes Pod Security
Standards as a namespace's admission controller would (e2e_llm.validate_pod_security)."""

from __future__ import annotations

import copy

import pytest

from e2e_llm.validate_pod_security import check_kuberay_pods, kuberay_pods, pod_security_problems

RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod(pod_ctx=None, container_ctx=None, **extra):
    container = {"name": "ray-head", "image": "registry.example/ray:1"}
    if container_ctx is not None:
        container["securityContext"] = container_ctx
    spec = {"containers": [container], **extra}
    if pod_ctx is not None:
        spec["securityContext"] = pod_ctx
    return spec


def _template(**extra):
    return {"spec": _pod(copy.deepcopy(RESTRICTED_POD), copy.deepcopy(RESTRICTED_CONTAINER),
                         serviceAccountName="sa", imagePullSecrets=[{"name": "pull"}], **extra)}


def _rayjob(**spec):
    cluster = {"headGroupSpec": {"template": _template()},
               "workerGroupSpecs": [{"groupName": "gpu", "template": _template()}]}
    return {"kind": "RayJob", "metadata": {"name": "job"}, "spec": {"rayClusterSpec": cluster, **spec}}


def test_a_restricted_pod_is_admitted_at_every_level():
    pod = _pod(RESTRICTED_POD, RESTRICTED_CONTAINER)
    assert [pod_security_problems(pod, level) for level in ("privileged", "baseline", "restricted")] == [[], [], []]


@pytest.mark.parametrize("pod, message", [
    (_pod(None, RESTRICTED_CONTAINER), "securityContext.runAsNonRoot: must be true"),
    (_pod({"runAsNonRoot": True}, RESTRICTED_CONTAINER), "seccompProfile.type: must be RuntimeDefault or Localhost"),
    (_pod(RESTRICTED_POD, {"capabilities": {"drop": ["ALL"]}}), "allowPrivilegeEscalation: must be false"),
    (_pod(RESTRICTED_POD, {"allowPrivilegeEscalation": False}), "capabilities.drop: must include ALL"),
    (_pod(RESTRICTED_POD, {**RESTRICTED_CONTAINER, "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]}}),
     "only NET_BIND_SERVICE may be added, not CHOWN"),
    (_pod({**RESTRICTED_POD, "runAsUser": 0}, RESTRICTED_CONTAINER), "spec.securityContext.runAsUser: must not be 0"),
    (_pod(RESTRICTED_POD, {**RESTRICTED_CONTAINER, "runAsNonRoot": False}), "runAsNonRoot: must be true"),
    (_pod(RESTRICTED_POD, RESTRICTED_CONTAINER, volumes=[{"name": "nfs", "nfs": {"server": "x", "path": "/"}}]),
     "spec.volumes[nfs]: volume type nfs not allowed (restricted)"),
])
def test_restricted_rules_name_the_field(pod, message):
    problems = pod_security_problems(pod, "restricted")
    assert any(message in p for p in problems), problems
    assert not any(message in p for p in pod_security_problems(pod, "baseline"))


@pytest.mark.parametrize("pod, message", [
    (_pod(RESTRICTED_POD, {**RESTRICTED_CONTAINER, "privileged": True}), "privileged: must be unset or false"),
    (_pod(RESTRICTED_POD, RESTRICTED_CONTAINER, hostNetwork=True), "spec.hostNetwork: must be unset or false"),
    (_pod(RESTRICTED_POD, RESTRICTED_CONTAINER, volumes=[{"name": "d", "hostPath": {"path": "/d"}}]),
     "spec.volumes[d].hostPath: not allowed"),
    (_pod(RESTRICTED_POD, {**RESTRICTED_CONTAINER, "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}),
     "capabilities.add: SYS_ADMIN not allowed (baseline)"),
    (_pod({"seccompProfile": {"type": "Unconfined"}}, None), "seccompProfile.type: Unconfined not allowed"),
    (_pod(RESTRICTED_POD, RESTRICTED_CONTAINER) | {"containers": [{"name": "c", "ports": [{"hostPort": 80}]}]},
     "spec.containers[c].ports: hostPort 80 not allowed"),
])
def test_baseline_rules_hold_at_both_levels(pod, message):
    for level in ("baseline", "restricted"):
        assert any(message in p for p in pod_security_problems(pod, level)), (level, pod_security_problems(pod, level))
    assert pod_security_problems(pod, "privileged") == []


def test_a_container_setting_overrides_the_pods():
    pod = _pod({"runAsNonRoot": True}, {**RESTRICTED_CONTAINER, "seccompProfile": {"type": "Localhost",
                                                                                  "localhostProfile": "ray.json"}})
    assert pod_security_problems(pod) == []


def test_kuberay_adds_an_init_container_with_the_ray_containers_security_context_and_a_default_submitter():
    pods = dict(kuberay_pods(_rayjob()))
    worker = pods["worker pod of group gpu"]
    assert [c["name"] for c in worker["initContainers"]] == ["wait-gcs-ready"]
    assert worker["initContainers"][0]["securityContext"] == RESTRICTED_CONTAINER
    default = "submitter pod (KubeRay's default template: set spec.submitterPodTemplate)"
    assert pods[default]["containers"][0]["image"] == "registry.example/ray:1"
    problems = check_kuberay_pods(_rayjob())
    assert problems and all(p.startswith(f"RayJob/job: {default}: ") for p in problems), problems
    assert any("spec.imagePullSecrets: pulls its image without the head's pull" in p for p in problems)
    assert any("spec.serviceAccountName: 'default' is not the head's 'sa'" in p for p in problems)


def test_a_submitter_template_like_the_head_pod_is_admitted():
    assert check_kuberay_pods(_rayjob(submitterPodTemplate=_template(restartPolicy="Never"))) == []


@pytest.mark.parametrize("mode, has_submitter_pod", [("HTTPMode", False), ("InteractiveMode", False),
                                                     ("K8sJobMode", True), ("SidecarMode", False)])
def test_which_submission_modes_get_a_submitter_pod(mode, has_submitter_pod):
    pods = dict(kuberay_pods(_rayjob(submissionMode=mode)))
    assert any(what.startswith("submitter pod") for what in pods) is has_submitter_pod
    in_head = [c["name"] for c in pods["head pod"]["containers"]]
    assert ("ray-job-submitter" in in_head) is (mode == "SidecarMode")


def test_sidecar_submitter_and_autoscaler_are_containers_of_the_head_pod():
    job = _rayjob(submissionMode="SidecarMode")
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = True
    problems = check_kuberay_pods(job)
    for container in ("ray-job-submitter", "autoscaler"):
        assert any(f"head pod: spec.containers[{container}].securityContext.allowPrivilegeEscalation" in p
                   for p in problems), problems
    job["spec"]["rayClusterSpec"]["autoscalerOptions"] = {"securityContext": RESTRICTED_CONTAINER}
    assert not any("containers[autoscaler]" in p for p in check_kuberay_pods(job))


def test_other_kinds_make_no_pods():
    assert kuberay_pods({"kind": "ConfigMap", "spec": {}}) == []
    assert pod_security_problems({}, "strict") == ["unknown Pod Security level 'strict' (one of privileged, "
                                                    "baseline, restricted)"]
