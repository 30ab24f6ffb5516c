# SPDX-License-Identifier: Apache-2.0
"""The ``openshift`` kustomize component: Ray pods OpenShift's default security context
constraint, ``restricted-v2`` (OpenShift 4.11+), admits.

restricted-v2 gives each pod a uid, an fsGroup and an SELinux level from its namespace's ranges
(``MustRunAs``) and refuses a pod that names its own ("fsGroup: Invalid value: []int64{100}: 100
is not an allowed group"). The base names fsGroup 100, the image user's group, which gives it the
shared volume elsewhere, so every RayJob and RayService of the base was refused there. The
component removes each such value from every pod template (head, worker groups, the RayJob
submitter) and asks for restricted-v2 by name (``openshift.io/required-scc``), which is also how
``validate_pod_security.check_openshift_pods`` knows to check a pod against it. Under that
arbitrary uid, in group 0, the images' HOME and project folder stay writable
(``validate_lint.check_containerfile``).

The patches are derived from the rendered base documents, so a template added there is covered.
"""

from __future__ import annotations

from typing import Any

from e2e_llm.validate_common import json_pointer, pod_templates

REQUIRED_SCC_ANNOTATION = "openshift.io/required-scc"
REQUIRED_SCC = "restricted-v2"
# securityContext fields restricted-v2 assigns from the namespace's ranges: a value of our own is refused.
SCC_ASSIGNED_POD_FIELDS = ("fsGroup", "runAsUser", "seLinuxOptions")
SCC_ASSIGNED_CONTAINER_FIELDS = ("runAsUser", "seLinuxOptions")


def openshift_operations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON patch that makes ``doc``'s pods restricted-v2's: fields it assigns removed, the
    SCC asked for by name."""
    ops: list[dict[str, Any]] = []
    for keys, template in pod_templates(doc):
        path = json_pointer(keys)
        spec = template["spec"]
        context = spec.get("securityContext") or {}
        ops += [{"op": "remove", "path": f"{path}/spec/securityContext/{field}"}
                for field in SCC_ASSIGNED_POD_FIELDS if field in context]
        for kind in ("initContainers", "containers"):
            for i, container in enumerate(spec.get(kind) or []):
                context = container.get("securityContext") or {}
                ops += [{"op": "remove", "path": f"{path}/spec/{kind}/{i}/securityContext/{field}"}
                        for field in SCC_ASSIGNED_CONTAINER_FIELDS if field in context]
        metadata = template.get("metadata")
        if metadata is None:
            ops.append({"op": "add", "path": f"{path}/metadata",
                        "value": {"annotations": {REQUIRED_SCC_ANNOTATION: REQUIRED_SCC}}})
        elif metadata.get("annotations") is None:
            ops.append({"op": "add", "path": f"{path}/metadata/annotations",
                        "value": {REQUIRED_SCC_ANNOTATION: REQUIRED_SCC}})
        else:
            ops.append({"op": "add", "path": json_pointer([*keys, "metadata", "annotations", REQUIRED_SCC_ANNOTATION]),
                        "value": REQUIRED_SCC})
    return ops


def openshift_patches(base_docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The component's patches: one JSON patch per base document that has pods."""
    from e2e_llm.render_common import dump

    patches = []
    for doc in base_docs:
        if ops := openshift_operations(doc):
            group, _, version = doc["apiVersion"].rpartition("/")
            target = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
            patches.append({"target": {k: v for k, v in target.items() if v}, "patch": dump(ops)})
    return patches
