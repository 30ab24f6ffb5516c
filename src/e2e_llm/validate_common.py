# SPDX-License-Identifier: Apache-2.0
"""Shared pieces of the validation ladder (``e2e_llm.validate``): where the KubeRay CRDs live,
how problems name their object and field, pod templates of Ray kinds."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.33"
KUBERAY_CRDS = "k8s/crds/kuberay-v1.7.0"  # under ../shared
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
CORE_KINDS = {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "Secret", "Service"}
RAY_NODE_TEMPLATE = ("rayClusterSpec", "rayClusterConfig")
# Kubernetes' DNS-1035 label: what KubeRay requires of RayJob/RayService/RayCluster names.
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _fmt(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", str(text))
    return tuple(int(x) for x in m.groups()) if m else None


def _int(value: Any, default: int | None = None) -> int | None:
    """An integer field's value for rule checks; wrong types are the schema check's to report."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default



def json_pointer(path: list[Any]) -> str:
    """The JSON pointer (RFC 6901: "~" and "/" escaped) to ``path``'s keys and list indices."""
    return "".join("/" + str(key).replace("~", "~0").replace("/", "~1") for key in path)


def pod_templates(node: Any, path: tuple = ()) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """(path, template) of every pod template in a document: a mapping whose ``spec`` holds
    ``containers``, whatever key it sits under (a Ray cluster's head and worker groups'
    ``template``, a RayJob's ``submitterPodTemplate``, a Deployment's ``template``). The path is
    the keys and list indices that lead to it."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield list(path), node
            return
        for key, value in node.items():
            yield from pod_templates(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_templates(value, (*path, i))
