# SPDX-License-Identifier: Apache-2.0
"""Cross-object checks of a built (kustomized) set of manifests: the mistakes that pass every
single-object check because each object is valid alone.

- Ray versions: every cluster's ``rayVersion`` equals the Ray version in the tag of every image
  it runs (head and every worker group, after overlays, so an ``images:`` bump that leaves
  ``rayVersion`` behind is caught) and the ``ray`` pin of that image's lock file.
- Image skew: head and all worker groups of one cluster run the same image.
- Node machine: every pod template (head, workers, RayJob submitter) selects Linux nodes of the
  machine its image's tag is built for (``kubernetes.io/arch``; an overlay that moves the image to
  an ``-aarch64`` tag must move the selector too), or a pod lands on the other machine's nodes and
  fails with "exec format error".
- GPUs: ``nvidia.com/gpu`` requests equal limits; a worker group on GPU nodes (GPU node selector
  or toleration) requests GPUs; Serve's ``accelerator_type`` has a GPU worker group on that
  accelerator's nodes; Serve ``max_replicas`` x GPUs per replica fits in the GPU worker groups'
  ``maxReplicas`` x GPUs per pod.
- RayJob entrypoints resolve: parsed like a shell would, ``e2e-llm <subcommand>`` exists and its
  arguments parse with the CLI's own parser, and the ``--profile`` file exists.
- References: every PVC, Secret, ConfigMap and ServiceAccount a pod template names exists in the
  build, or is declared external (the Secrets named in ``configs/deploy.yaml``: one list).

Usage:
    context = CrossContext.from_deploy(load_deploy(root=root))
    problems = check_cross(docs, context)
"""

from __future__ import annotations

import contextlib
import io
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2e_llm.validate_common import RAY_NODE_TEMPLATE, _fmt, _name, pod_templates

GPU = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.product"


@dataclass
class CrossContext:
    root: Path
    ray_locks: dict[str, str] = field(default_factory=dict)    # image repository -> lock's ray pin
    accelerators: dict[str, dict[str, str]] = field(default_factory=dict)  # accelerator -> node selector
    external: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) created out of band

    @classmethod
    def from_deploy(cls, deploy: Any) -> CrossContext:
        from e2e_llm.pins import lock_pins

        root = deploy._root
        locks = {}
        for name, image in (("train", deploy.images.train), ("serve", deploy.images.serve)):
            lock = root / "images" / name / "requirements.lock"
            if lock.is_file():
                locks[image.repository] = lock_pins(lock).get("ray", "")
        return cls(root=root, ray_locks=locks,
                   accelerators={k: dict(v.node_selector) for k, v in deploy.accelerators.items()},
                   external=deploy.external_objects())


def _clusters(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = doc.get("spec") or {}
    return [(f"spec.{key}", spec[key]) for key in RAY_NODE_TEMPLATE if isinstance(spec.get(key), dict)]


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return ((template or {}).get("spec") or {}).get("containers") or []


def _gpus(container: dict[str, Any], kind: str = "limits") -> int:
    value = ((container.get("resources") or {}).get(kind) or {}).get(GPU)
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


def _image_ray(image: str) -> str | None:
    from e2e_llm.deploy import IMAGE_TAG, reference_tag

    m = IMAGE_TAG.match(reference_tag(image))
    return m["ray"] if m else None


# ---------------------------------------------------------------------------------------
# Ray versions and image skew


def check_ray_versions(doc: dict[str, Any], ctx: CrossContext) -> list[str]:
    problems = []
    for where, cluster in _clusters(doc):
        version = str(cluster.get("rayVersion", ""))
        images: dict[str, str] = {}
        groups = [("headGroupSpec", cluster.get("headGroupSpec") or {})]
        groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
        for gwhere, group in groups:
            for j, container in enumerate(_containers(group.get("template"))):
                image = str(container.get("image", ""))
                at = f"{_name(doc)}: {where}.{gwhere}.template.spec.containers[{j}].image"
                if j == 0:
                    images[gwhere] = image
                ray = _image_ray(image)
                if ray is None:
                    if j == 0:
                        problems.append(f"{at}: {image!r} has no <ray>-py<NNN>-<platform> tag to check rayVersion")
                    continue
                if ray != version:
                    problems.append(f"{at}: image Ray {ray} != {where}.rayVersion {version} (bump both together)")
                repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
                locked = ctx.ray_locks.get(repository.partition("@")[0])
                if locked and locked != ray:
                    problems.append(f"{at}: image Ray {ray} != ray=={locked} in the lock of {repository}")
        distinct = sorted(set(images.values()))
        if len(distinct) > 1:
            head = images.get("headGroupSpec")
            for gwhere, image in images.items():
                if image != head:
                    problems.append(f"{_name(doc)}: {where}.{gwhere}: image {image} != head image {head} "
                                    "(head and workers must run the same image)")
    return problems


# ---------------------------------------------------------------------------------------
# GPUs and Serve capacity


def check_gpus(doc: dict[str, Any], ctx: CrossContext) -> list[str]:
    problems = []
    for path, template in pod_templates(doc):
        at = f"{_name(doc)}: {_fmt(path)}"
        spec = (template or {}).get("spec") or {}
        gpu_total = 0
        for j, container in enumerate(_containers(template)):
            req, lim = _gpus(container, "requests"), _gpus(container, "limits")
            resources = container.get("resources") or {}
            if GPU in (resources.get("requests") or {}) and req != lim:
                problems.append(f"{at}.spec.containers[{j}].resources: {GPU} requests {req} != limits {lim} "
                                "(extended resources need requests == limits)")
            gpu_total += lim
        wants_gpu = GPU_NODE_LABEL in (spec.get("nodeSelector") or {}) or any(
            t.get("key") == GPU for t in spec.get("tolerations") or [])
        if wants_gpu and gpu_total == 0 and "workerGroupSpecs" in path:
            problems.append(f"{at}.spec: scheduled on GPU nodes (nodeSelector/toleration) but requests no {GPU}")
    return problems


def _serve_llm_configs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    text = (doc.get("spec") or {}).get("serveConfigV2")
    try:
        config = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return []  # the Serve step reports it
    out = []
    for i, app in enumerate((config or {}).get("applications") or []):
        for j, llm in enumerate(((app or {}).get("args") or {}).get("llm_configs") or []):
            out.append((f"spec.serveConfigV2.applications[{i}].args.llm_configs[{j}]", llm or {}))
    return out


def gpus_per_replica(llm: dict[str, Any]) -> int:
    """GPUs one replica of a Ray Serve LLM deployment takes: the placement group's GPU bundles if
    given, else tensor x pipeline parallel size (one GPU per engine worker, Ray Serve LLM's
    default), 0 on a CPU accelerator config."""
    if ((llm.get("accelerator_config") or {}).get("kind")) == "cpu":
        return 0
    bundles = (llm.get("placement_group_config") or {}).get("bundles")
    if bundles:
        return int(sum(float(b.get("GPU", 0)) for b in bundles))
    engine = llm.get("engine_kwargs") or {}
    return int(engine.get("tensor_parallel_size", 1)) * int(engine.get("pipeline_parallel_size", 1))


def check_serve_capacity(doc: dict[str, Any], ctx: CrossContext) -> list[str]:
    if doc.get("kind") != "RayService":
        return []
    cluster = (doc.get("spec") or {}).get("rayClusterConfig") or {}
    groups = []
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        template = group.get("template") or {}
        gpus = sum(_gpus(c) for c in _containers(template))
        selector = ((template.get("spec") or {}).get("nodeSelector")) or {}
        groups.append((i, group, gpus, selector))
    problems = []
    for where, llm in _serve_llm_configs(doc):
        at = f"{_name(doc)}: {where}"
        need = gpus_per_replica(llm)
        accelerator = llm.get("accelerator_type")
        if not need:
            continue
        candidates = [(i, g, n) for i, g, n, sel in groups if n > 0]
        if accelerator:
            selector = ctx.accelerators.get(accelerator)
            if selector is None:
                problems.append(f"{at}.accelerator_type: {accelerator!r} has no node selector in configs/deploy.yaml "
                                f"accelerators ({', '.join(sorted(ctx.accelerators)) or 'none'})")
                continue
            candidates = [(i, g, n) for i, g, n, sel in groups
                          if n > 0 and all(sel.get(k) == v for k, v in selector.items())]
            if not candidates:
                problems.append(f"{at}.accelerator_type: {accelerator} needs a GPU worker group with nodeSelector "
                                f"{selector}; none in spec.rayClusterConfig.workerGroupSpecs")
                continue
        elif not candidates:
            problems.append(f"{at}: a replica needs {need} GPU(s) but no worker group requests {GPU}")
            continue
        per_pod = max(n for _, _, n in candidates)
        if need > per_pod:
            problems.append(f"{at}: a replica needs {need} GPUs on one node, the largest GPU worker pod has {per_pod}")
        autoscaling = (llm.get("deployment_config") or {}).get("autoscaling_config") or {}
        max_replicas = autoscaling.get("max_replicas") or (llm.get("deployment_config") or {}).get("num_replicas") or 1
        capacity = sum(int(g.get("maxReplicas", g.get("replicas", 0)) or 0) * n for _, g, n in candidates)
        if isinstance(max_replicas, int) and max_replicas * need > capacity:
            problems.append(f"{at}.deployment_config.autoscaling_config.max_replicas: {max_replicas} x {need} GPU(s) "
                            f"= {max_replicas * need} > {capacity} GPUs the worker groups can hold "
                            "(maxReplicas x GPUs per pod)")
    return problems


# ---------------------------------------------------------------------------------------
# RayJob entrypoints


def check_entrypoint(doc: dict[str, Any], ctx: CrossContext) -> list[str]:
    if doc.get("kind") != "RayJob":
        return []
    from e2e_llm.cli import COMMANDS, build_parser
    from e2e_llm.config import profile_path

    at = f"{_name(doc)}: spec.entrypoint"
    text = str((doc.get("spec") or {}).get("entrypoint", ""))
    try:
        words = shlex.split(text)
    except ValueError as exc:
        return [f"{at}: does not parse as a command line ({exc})"]
    if not words or words[0] != "e2e-llm":
        return [f"{at}: {text!r} does not run the e2e-llm CLI"]
    if len(words) < 2 or words[1] not in COMMANDS:
        return [f"{at}: e2e-llm has no subcommand {words[1] if len(words) > 1 else ''!r} "
                f"(known: {', '.join(sorted(COMMANDS))})"]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(words[1:])
    except SystemExit:
        message = err.getvalue().strip().splitlines()
        return [f"{at}: {text!r}: {message[-1] if message else 'arguments do not parse'}"]
    profile = getattr(args, "profile", None)
    if profile and not profile_path(profile, root=ctx.root).is_file():
        return [f"{at}: --profile {profile}: no file {profile_path(profile, root=ctx.root)}"]
    return []


# ---------------------------------------------------------------------------------------
# References


def _references(template: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, name, field) for every object a pod spec names."""
    spec = (template or {}).get("spec") or {}
    refs = []
    if spec.get("serviceAccountName"):
        refs.append(("ServiceAccount", spec["serviceAccountName"], "serviceAccountName"))
    for i, secret in enumerate(spec.get("imagePullSecrets") or []):
        refs.append(("Secret", secret.get("name", ""), f"imagePullSecrets[{i}]"))
    for i, volume in enumerate(spec.get("volumes") or []):
        if claim := (volume.get("persistentVolumeClaim") or {}).get("claimName"):
            refs.append(("PersistentVolumeClaim", claim, f"volumes[{i}]"))
        if name := (volume.get("secret") or {}).get("secretName"):
            refs.append(("Secret", name, f"volumes[{i}]"))
        if name := (volume.get("configMap") or {}).get("name"):
            refs.append(("ConfigMap", name, f"volumes[{i}]"))
        for source in (volume.get("projected") or {}).get("sources") or []:
            for key, kind in (("secret", "Secret"), ("configMap", "ConfigMap")):
                if name := (source.get(key) or {}).get("name"):
                    refs.append((kind, name, f"volumes[{i}].projected"))
    for group in ("initContainers", "containers"):
        for j, container in enumerate(spec.get(group) or []):
            for k, env in enumerate(container.get("env") or []):
                source = env.get("valueFrom") or {}
                for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if name := (source.get(key) or {}).get("name"):
                        refs.append((kind, name, f"{group}[{j}].env[{k}]"))
            for k, env in enumerate(container.get("envFrom") or []):
                for key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    if name := (env.get(key) or {}).get("name"):
                        refs.append((kind, name, f"{group}[{j}].envFrom[{k}]"))
    return refs


def check_references(docs: list[dict[str, Any]], ctx: CrossContext) -> list[str]:
    present = {(d.get("kind"), (d.get("metadata") or {}).get("name")) for d in docs}
    problems = []
    for doc in docs:
        for path, template in pod_templates(doc):
            where = _fmt(path)
            for kind, name, at in _references(template):
                if (kind, name) not in present and (kind, name) not in ctx.external:
                    problems.append(f"{_name(doc)}: {where}.spec.{at}: {kind} {name!r} is neither in the build nor "
                                    "declared external (configs/deploy.yaml secrets / registry)")
    return problems


def _required_arch(template: dict[str, Any]) -> set[str] | None:
    """The ``kubernetes.io/arch`` values a pod template requires (nodeSelector, or a required
    node affinity term), None when it requires none."""
    spec = (template or {}).get("spec") or {}
    if arch := (spec.get("nodeSelector") or {}).get("kubernetes.io/arch"):
        return {str(arch)}
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == "kubernetes.io/arch" and expr.get("operator") == "In":
                return {str(v) for v in expr.get("values") or []}
    return None


def check_node_arch(doc: dict[str, Any]) -> list[str]:
    from e2e_llm.deploy import KUBERNETES_ARCH, reference_tag, tag_machine

    problems = []
    for path, template in pod_templates(doc):
        containers = _containers(template)
        image = str(containers[0].get("image", "")) if containers else ""
        machine = tag_machine(reference_tag(image))
        if machine is None:
            continue
        want, required = KUBERNETES_ARCH[machine], _required_arch(template)
        at = f"{_name(doc)}: {_fmt(path)}.spec"
        if required is None:
            problems.append(f"{at}.nodeSelector: no kubernetes.io/arch: {want} for {image} ({machine}): on a cluster "
                            "with nodes of another machine the pod can land there and fail with exec format error")
        elif required != {want}:
            problems.append(f"{at}: requires kubernetes.io/arch {sorted(required)}, but {image} is built for "
                            f"{machine} ({want}): move both together")
    return problems


def check_cross(docs: list[dict[str, Any]], ctx: CrossContext) -> list[str]:
    """Every cross-object check over one built overlay."""
    problems = []
    for doc in docs:
        problems += check_ray_versions(doc, ctx)
        problems += check_node_arch(doc)
        problems += check_gpus(doc, ctx)
        problems += check_serve_capacity(doc, ctx)
        problems += check_entrypoint(doc, ctx)
    problems += check_references(docs, ctx)
    return problems
