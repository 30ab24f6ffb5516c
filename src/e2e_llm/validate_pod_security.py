# SPDX-License-Identifier: Apache-2.0
"""Ladder step 4c: the pods KubeRay creates from a RayJob or RayService, as the admission
controller of a namespace sees them.

A template can pass the CRD schema and still give pods that never start:

- the KubeRay operator adds pods and containers of its own, built from parts of the templates
  (KubeRay v1.7, ``ray-operator/controllers/ray``): the RayJob submitter Job's pod
  (``spec.submitterPodTemplate``, or a default one with the head's image and nothing else), the
  workers' ``wait-gcs-ready`` init container (the Ray container's ``securityContext``), the head's
  ``autoscaler`` container (``autoscalerOptions.securityContext``), and in ``SidecarMode`` a
  submitter container in the head pod (no ``securityContext``);
- a namespace enforcing a Pod Security Standard (``pod-security.kubernetes.io/enforce``) refuses
  every pod that breaks it, and a Job's refused pod only shows up as events;
- a pod pulls its image with the ``imagePullSecrets`` of its own spec (or its service account):
  a submitter pod without the head's cannot pull a private image.

:func:`kuberay_pods` builds those pods from a document; :func:`pod_security_problems` checks one
pod spec against the Kubernetes Pod Security Standards (``baseline``, ``restricted``; the rules of
kubernetes.io/docs/concepts/security/pod-security-standards, Kubernetes 1.33).
"""

from __future__ import annotations

import copy
from typing import Any

from e2e_llm.validate_common import _name

LEVELS = ("privileged", "baseline", "restricted")
ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
SUBMITTER_CONTAINER = "ray-job-submitter"   # KubeRay's utils.SubmitterContainerName
INIT_CONTAINER = "wait-gcs-ready"
AUTOSCALER_CONTAINER = "autoscaler"

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret", "image"}
SECCOMP_ALLOWED = ("RuntimeDefault", "Localhost")


# ---------------------------------------------------------------------------------------
# The pods KubeRay creates


def kuberay_pods(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(what, pod spec) for each kind of pod the operator creates from a RayJob/RayService, with
    the containers KubeRay adds; empty for other kinds."""
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") if doc.get("kind") == "RayJob" else spec.get("rayClusterConfig")
    if doc.get("kind") not in ("RayJob", "RayService") or not cluster:
        return []
    pods = []
    head = copy.deepcopy(((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {})
    if head.get("containers"):
        if cluster.get("enableInTreeAutoscaling"):
            autoscaler: dict[str, Any] = {"name": AUTOSCALER_CONTAINER}
            if context := (cluster.get("autoscalerOptions") or {}).get("securityContext"):
                autoscaler["securityContext"] = copy.deepcopy(context)
            head["containers"].append(autoscaler)
        if doc.get("kind") == "RayJob" and spec.get("submissionMode") == "SidecarMode":
            head["containers"].append({"name": SUBMITTER_CONTAINER})
        pods.append(("head pod", head))
    for group in cluster.get("workerGroupSpecs") or []:
        worker = copy.deepcopy((group.get("template") or {}).get("spec") or {})
        if not worker.get("containers"):
            continue
        init: dict[str, Any] = {"name": INIT_CONTAINER, "image": worker["containers"][0].get("image")}
        if context := worker["containers"][0].get("securityContext"):
            init["securityContext"] = copy.deepcopy(context)
        worker["initContainers"] = [*(worker.get("initContainers") or []), init]
        pods.append((f"worker pod of group {group.get('groupName', '?')}", worker))
    if doc.get("kind") == "RayJob" and spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
        if spec.get("submitterPodTemplate"):
            pods.append(("submitter pod", copy.deepcopy(spec["submitterPodTemplate"].get("spec") or {})))
        else:
            image = (head.get("containers") or [{}])[0].get("image")
            pods.append(("submitter pod (KubeRay's default template: set spec.submitterPodTemplate)",
                         {"containers": [{"name": SUBMITTER_CONTAINER, "image": image}],
                          "restartPolicy": "Never"}))
    return pods


def check_kuberay_pods(doc: dict[str, Any], level: str = "restricted") -> list[str]:
    """Every pod KubeRay creates from ``doc``: admitted at Pod Security ``level``, and pulling its
    image with the head pod's ``imagePullSecrets`` and service account."""
    problems = []
    pods = kuberay_pods(doc)
    head = next((pod for what, pod in pods if what == "head pod"), {})
    secrets = sorted(s.get("name", "") for s in head.get("imagePullSecrets") or [])
    for what, pod in pods:
        where = f"{_name(doc)}: {what}"
        problems += [f"{where}: {p}" for p in pod_security_problems(pod, level)]
        if secrets and sorted(s.get("name", "") for s in pod.get("imagePullSecrets") or []) != secrets:
            problems.append(f"{where}: spec.imagePullSecrets: pulls its image without the head's "
                            f"{', '.join(secrets)}; it cannot start where the registry is private")
        if head and pod.get("serviceAccountName") != head.get("serviceAccountName"):
            problems.append(f"{where}: spec.serviceAccountName: {pod.get('serviceAccountName') or 'default'!r} "
                            f"is not the head's {head.get('serviceAccountName') or 'default'!r}")
    return problems


def check_openshift_pods(doc: dict[str, Any]) -> list[str]:
    """For a document whose pod templates ask for OpenShift's restricted-v2 SCC (the ``openshift``
    component, e2e_llm.render_openshift): every template asks for it, and no pod KubeRay creates
    from them names a value restricted-v2 assigns from the namespace's ranges (it refuses the pod)."""
    from e2e_llm.render_openshift import (
        REQUIRED_SCC,
        REQUIRED_SCC_ANNOTATION,
        SCC_ASSIGNED_CONTAINER_FIELDS,
        SCC_ASSIGNED_POD_FIELDS,
    )
    from e2e_llm.validate_common import json_pointer, pod_templates

    asked = {path: ((template.get("metadata") or {}).get("annotations") or {}).get(REQUIRED_SCC_ANNOTATION)
             for path, template in ((json_pointer(keys), t) for keys, t in pod_templates(doc))}
    if not any(asked.values()):
        return []
    problems = [f"{_name(doc)}: {path}/metadata/annotations: {REQUIRED_SCC_ANNOTATION} is {scc!r}, not "
                f"{REQUIRED_SCC!r} as the other pod templates' (its pods may get another SCC)"
                for path, scc in asked.items() if scc != REQUIRED_SCC]
    assigned = f"{REQUIRED_SCC} assigns it from the namespace's range and refuses a pod that sets one"
    for what, pod in kuberay_pods(doc):
        context = pod.get("securityContext") or {}
        problems += [f"{_name(doc)}: {what}: spec.securityContext.{field}: {assigned}"
                     for field in SCC_ASSIGNED_POD_FIELDS if field in context]
        for where, container in _containers(pod):
            context = container.get("securityContext") or {}
            problems += [f"{_name(doc)}: {what}: {where}.securityContext.{field}: {assigned}"
                         for field in SCC_ASSIGNED_CONTAINER_FIELDS if field in context]
    return problems


def namespace_levels(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Namespace name -> the Pod Security level it enforces (its label; absent: privileged)."""
    return {(d.get("metadata") or {}).get("name", "?"):
            ((d.get("metadata") or {}).get("labels") or {}).get(ENFORCE_LABEL, "privileged")
            for d in docs if d.get("kind") == "Namespace"}


def enforced_level(docs: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The level a build's pods must meet: the strictest its namespaces enforce; without a
    namespace (the base alone), the one the bundle is built to ("restricted",
    e2e_llm.render_kuberay). A level the admission controller does not know is a problem naming
    the namespace, and the pods are held to "restricted" meanwhile."""
    levels = namespace_levels(docs)
    problems = [f"Namespace/{name}: metadata.labels.{ENFORCE_LABEL}: {level!r} is not one of {', '.join(LEVELS)}"
                for name, level in sorted(levels.items()) if level not in LEVELS]
    known = [level for level in levels.values() if level in LEVELS]
    if problems or not known:
        return "restricted", problems
    return max(known, key=LEVELS.index), []


# ---------------------------------------------------------------------------------------
# Pod Security Standards


def _containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for key in ("initContainers", "containers", "ephemeralContainers"):
        out += [(f"spec.{key}[{c.get('name', i)}]", c) for i, c in enumerate(spec.get(key) or [])]
    return out


def pod_security_problems(spec: dict[str, Any], level: str = "restricted") -> list[str]:
    """Why a pod with ``spec`` would be refused in a namespace enforcing ``level`` (empty: admitted)."""
    if level not in LEVELS:
        return [f"unknown Pod Security level {level!r} (one of {', '.join(LEVELS)})"]
    if level == "privileged":
        return []
    problems = _baseline(spec)
    if level == "restricted":
        problems += _restricted(spec)
    return problems


def _baseline(spec: dict[str, Any]) -> list[str]:
    problems = []
    pod_ctx = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"spec.{field}: must be unset or false (baseline)")
    if (pod_ctx.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("spec.securityContext.windowsOptions.hostProcess: must be unset or false (baseline)")
    for i, volume in enumerate(spec.get("volumes") or []):
        if "hostPath" in volume:
            problems.append(f"spec.volumes[{volume.get('name', i)}].hostPath: not allowed (baseline)")
    for sysctl in pod_ctx.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"spec.securityContext.sysctls: {sysctl.get('name')!r} is not a safe sysctl (baseline)")
    problems += _selinux("spec.securityContext", pod_ctx)
    problems += _seccomp_not_unconfined("spec.securityContext", pod_ctx)
    for where, c in _containers(spec):
        ctx = c.get("securityContext") or {}
        if ctx.get("privileged"):
            problems.append(f"{where}.securityContext.privileged: must be unset or false (baseline)")
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):
            problems.append(f"{where}.securityContext.windowsOptions.hostProcess: must be unset or false (baseline)")
        added = set((ctx.get("capabilities") or {}).get("add") or []) - BASELINE_CAPABILITIES
        if added:
            problems.append(f"{where}.securityContext.capabilities.add: {', '.join(sorted(added))} "
                            "not allowed (baseline)")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{where}.ports: hostPort {port['hostPort']} not allowed (baseline)")
        if ctx.get("procMount", "Default") != "Default":
            problems.append(f"{where}.securityContext.procMount: must be Default (baseline)")
        if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined":
            problems.append(f"{where}.securityContext.appArmorProfile.type: Unconfined not allowed (baseline)")
        problems += _selinux(f"{where}.securityContext", ctx)
        problems += _seccomp_not_unconfined(f"{where}.securityContext", ctx)
    return problems


def _selinux(where: str, ctx: dict[str, Any]) -> list[str]:
    options = ctx.get("seLinuxOptions") or {}
    problems = []
    if options.get("type", "") not in SELINUX_TYPES:
        problems.append(f"{where}.seLinuxOptions.type: {options['type']!r} not allowed (baseline)")
    problems += [f"{where}.seLinuxOptions.{key}: must be unset (baseline)"
                 for key in ("user", "role") if options.get(key)]
    return problems


def _seccomp_not_unconfined(where: str, ctx: dict[str, Any]) -> list[str]:
    if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
        return [f"{where}.seccompProfile.type: Unconfined not allowed (baseline)"]
    return []


def _restricted(spec: dict[str, Any]) -> list[str]:
    problems = []
    pod_ctx = spec.get("securityContext") or {}
    for i, volume in enumerate(spec.get("volumes") or []):
        kinds = set(volume) - {"name"}
        if kinds - RESTRICTED_VOLUMES:
            problems.append(f"spec.volumes[{volume.get('name', i)}]: volume type {', '.join(sorted(kinds))} "
                            "not allowed (restricted)")
    if pod_ctx.get("runAsUser") == 0:
        problems.append("spec.securityContext.runAsUser: must not be 0 (restricted)")
    pod_seccomp = (pod_ctx.get("seccompProfile") or {}).get("type")
    for where, c in _containers(spec):
        ctx = c.get("securityContext") or {}
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}.securityContext.allowPrivilegeEscalation: must be false (restricted)")
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        if non_root is not True:
            problems.append(f"{where}.securityContext.runAsNonRoot: must be true, here or in "
                            "spec.securityContext (restricted)")
        if ctx.get("runAsUser") == 0:
            problems.append(f"{where}.securityContext.runAsUser: must not be 0 (restricted)")
        seccomp = (ctx.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in SECCOMP_ALLOWED:
            problems.append(f"{where}.securityContext.seccompProfile.type: must be RuntimeDefault or Localhost, "
                            "here or in spec.securityContext (restricted)")
        capabilities = ctx.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{where}.securityContext.capabilities.drop: must include ALL (restricted)")
        added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{where}.securityContext.capabilities.add: only NET_BIND_SERVICE may be added, "
                            f"not {', '.join(sorted(added))} (restricted)")
    return problems
