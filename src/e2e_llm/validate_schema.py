# SPDX-License-Identifier: Apache-2.0
"""Ladder steps 3 and 5: KubeRay kinds against the CRD ``openAPIV3Schema`` with unknown fields
rejected and the CRD's CEL rules (cel-python); core objects and every pod template with
``kubernetes-validate --strict``; other kinds (the Prometheus Operator PodMonitor) against a
strict schema kept here; and no kind in a build goes without a schema (``check_kinds_covered``)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from e2e_llm.validate_common import (
    CORE_KINDS,
    CRD_FILES,
    KUBERNETES_VERSION,
    _fmt,
    _name,
    pod_templates,
)


def strict_schema(node: Any) -> Any:
    """A CRD openAPIV3Schema as JSON Schema that rejects unknown fields, the way the API
    server's strict field validation does: ``additionalProperties: false`` wherever
    ``properties`` are listed (unless ``x-kubernetes-preserve-unknown-fields``), ``nullable``
    as a null type, ``x-kubernetes-int-or-string`` as integer-or-string, int32/int64 ranges."""
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("type") == "integer" and node.get("format") in ("int32", "int64"):
        bits = 31 if node["format"] == "int32" else 63
        out.setdefault("minimum", -(2**bits))
        out.setdefault("maximum", 2**bits - 1)
    return out


@functools.cache
def crd_schema(crd_dir: Path, kind: str, version: str = "v1") -> dict[str, Any]:
    crd = yaml.safe_load((crd_dir / CRD_FILES[kind]).read_text(encoding="utf-8"))
    schema = version_schema(crd, version)
    if schema is None:
        raise KeyError(f"{kind} {version} not in {crd_dir / CRD_FILES[kind]}")
    return schema


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any] | None:
    """The ``openAPIV3Schema`` of ``version`` in a CRD object (a file's, or a cluster's)."""
    return next((v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version), None)


def check_crd_schema(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if kind not in CRD_FILES or not api.startswith("ray.io/"):
        return [f"{_name(doc)}: not a KubeRay kind (apiVersion {api!r})"]
    return schema_problems(doc, crd_schema(crd_dir, kind, api.split("/", 1)[1]))


def schema_problems(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """``doc`` against a CRD version's ``openAPIV3Schema``, unknown fields rejected."""
    from jsonschema import Draft7Validator

    validator = Draft7Validator(strict_schema(schema))
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            for extra in sorted(set(error.instance) - known):
                problems.append(f"{_name(doc)}: {_fmt([*path, extra])}: unknown field")
        else:
            problems.append(f"{_name(doc)}: {_fmt(path)}: {error.message}")
    return problems


def check_cel(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Evaluate the CRD's ``x-kubernetes-validations`` rules on the object (create-time rules
    only: rules that compare with ``oldSelf`` need an existing object and are skipped)."""
    import celpy

    kind, api = doc.get("kind", ""), doc.get("apiVersion", "ray.io/v1")
    if kind not in CRD_FILES:
        return []
    env = celpy.Environment()
    problems: list[str] = []

    def walk(schema: dict[str, Any], value: Any, path: list[Any]) -> None:
        for rule in schema.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            try:
                result = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
                ok = bool(result) if not isinstance(result, Exception) else False
            except Exception as exc:  # noqa: BLE001  an evaluation error rejects the object, as the API server does
                ok, rule = False, {**rule, "message": f"{rule.get('message', rule['rule'])} ({exc})"}
            if not ok:
                problems.append(f"{_name(doc)}: {_fmt(path)}: {rule.get('message', rule['rule'])}")
        if isinstance(value, dict):
            for key, sub in value.items():
                if key in schema.get("properties", {}):
                    walk(schema["properties"][key], sub, [*path, key])
                elif isinstance(schema.get("additionalProperties"), dict):
                    walk(schema["additionalProperties"], sub, [*path, key])
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                walk(schema["items"], item, [*path, i])

    walk(crd_schema(crd_dir, kind, api.split("/", 1)[1]), doc, [])
    return problems


def check_core_objects(docs: Iterable[dict[str, Any]]) -> list[str]:
    """Core kinds, and every pod template inside RayJob/RayService, against the Kubernetes
    OpenAPI schemas bundled in kubernetes-validate, strictly (unknown fields rejected)."""
    import kubernetes_validate

    problems = []

    def validate(obj: dict[str, Any], label: str, prefix: list[Any]) -> None:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{label}: {_fmt([*prefix, *exc.path])}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{label}: no Kubernetes {KUBERNETES_VERSION} schema for {obj.get('kind')}")

    for doc in docs:
        kind = doc.get("kind")
        if kind in CORE_KINDS:
            validate(doc, _name(doc), [])
        for path, template in [] if kind in CORE_KINDS else pod_templates(doc):  # core kinds: whole, above
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"}, "template": template}
            try:
                kubernetes_validate.validate(wrapper, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{_name(doc)}: {_fmt([*path, *list(exc.path)[1:]])}: {exc.message}")
    return problems



# ---------------------------------------------------------------------------------------
# Kinds without a CRD here: a strict schema of the fields this project renders (unknown
# fields rejected). PodMonitor: Prometheus Operator API reference, monitoring.coreos.com/v1
# PodMonitorSpec / PodMetricsEndpoint / RelabelConfig; extend it when a new field is rendered.

_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["key", "operator"],
        "properties": {"key": {"type": "string"}, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                       "values": _STRINGS}}}}}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": _STRINGS, "separator": {"type": "string"}, "targetLabel": {"type": "string"},
    "regex": {"type": "string"}, "modulus": {"type": "integer", "minimum": 0}, "replacement": {"type": "string"},
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
                        "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
                        "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]}}}
_METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
    "namespace": {"type": "string"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
POD_MONITOR_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata",
                                                                                    "spec"], "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"}, "metadata": _METADATA,
    "spec": {"type": "object", "additionalProperties": False, "required": ["selector"], "properties": {
        "jobLabel": {"type": "string"}, "podTargetLabels": _STRINGS, "selector": _LABEL_SELECTOR,
        "namespaceSelector": {"type": "object", "additionalProperties": False,
                              "properties": {"any": {"type": "boolean"}, "matchNames": _STRINGS}},
        "sampleLimit": {"type": "integer", "minimum": 0},
        "podMetricsEndpoints": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "properties": {
                "port": {"type": "string", "minLength": 1}, "portNumber": {"type": "integer", "minimum": 1,
                                                                            "maximum": 65535},
                "path": {"type": "string"}, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"},
                "honorTimestamps": {"type": "boolean"}, "params": {"type": "object"},
                "relabelings": {"type": "array", "items": _RELABEL},
                "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}
EXTRA_SCHEMAS = {("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR_SCHEMA}


def check_extra_kinds(doc: dict[str, Any]) -> list[str]:
    """Kinds with a schema in :data:`EXTRA_SCHEMAS` (others: not this check's)."""
    from jsonschema import Draft7Validator

    schema = EXTRA_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return []
    return [f"{_name(doc)}: {_fmt(e.absolute_path)}: {e.message}"
            for e in sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def check_kinds_covered(docs: Iterable[dict[str, Any]]) -> list[str]:
    """Every kind in a build is validated by some schema: a KubeRay CRD, the bundled Kubernetes
    core schemas, or :data:`EXTRA_SCHEMAS`. A new kind fails here until it gets one."""
    problems = []
    for doc in docs:
        api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
        covered = (kind in CRD_FILES and api.startswith("ray.io/")) or (kind in CORE_KINDS and "/" not in api) \
            or (api, kind) in EXTRA_SCHEMAS
        if not covered:
            problems.append(f"{_name(doc)}: no schema validates {api} {kind} (add one to "
                            "e2e_llm.validate_schema.EXTRA_SCHEMAS or a CRD)")
    return problems
