# SPDX-License-Identifier: Apache-2.0
"""Cross-object validation (`e2e_llm.validate_cross`, kinds coverage): a table of realistic
mistakes made to the rendered, built prod manifests, each caught with a message naming the
object and field; the committed dev and prod builds pass."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import ROOT, SHARED
from manifest_cache import built, deploy

from e2e_llm import cli
from e2e_llm.validate import (
    CrossContext,
    check_cross,
    check_extra_kinds,
    check_kinds_covered,
    kustomize_build,
    validate_documents,
)

SERVE_WORKER = ["spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec"]
TRAIN_WORKER = ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec"]
HEAD = ["spec", "rayClusterConfig", "headGroupSpec", "template", "spec"]


def _context() -> CrossContext:
    return CrossContext.from_deploy(deploy())


def problems(docs) -> list[str]:
    out = check_kinds_covered(docs) + check_cross(docs, _context())
    for doc in docs:
        out += check_extra_kinds(doc)
    return out


def _get(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _obj(docs, kind, name=None):
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


def _serve_llm(docs, edit):
    rs = _obj(docs, "RayService")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    edit(config["applications"][0]["args"]["llm_configs"][0])
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(config)


def _container(docs, kind, name, path):
    return _get(_obj(docs, kind, name), path)["containers"][0]


def _retag(image: str, tag: str) -> str:
    return image.rsplit(":", 1)[0] + ":" + tag


def _set_image(docs, kind, name, path, tag):
    c = _container(docs, kind, name, path)
    c["image"] = _retag(c["image"], tag)


def _add_deployment(docs):
    """What an overlay might add beside the Ray objects (a gateway, a metrics exporter)."""
    docs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "gateway", "namespace": "e2e-llm"},
                 "spec": {"selector": {"matchLabels": {"app": "gateway"}}, "template": {
                     "metadata": {"labels": {"app": "gateway"}},
                     "spec": {"containers": [{"name": "gateway", "image": "nginx:1.27",
                                              "envFrom": [{"secretRef": {"name": "gateway-keys"}}]}]}}}})


MUTATIONS = {
    "a Deployment from an overlay needs a Secret nobody made": (
        _add_deployment,
        "Deployment/gateway: spec.template.spec.containers[0].envFrom[0]: Secret 'gateway-keys' is neither in the "
        "build nor declared external"),
    "rayVersion bumped, images left behind": (
        lambda d: _obj(d, "RayService")["spec"]["rayClusterConfig"].update(rayVersion="2.61.0"),
        "containers[0].image: image Ray 2.60.0 != spec.rayClusterConfig.rayVersion 2.61.0"),
    "worker image of an older Ray": (
        lambda d: _set_image(d, "RayJob", "e2e-llm-train", TRAIN_WORKER, "2.59.0-py311-cu128-aaaaaaaaaaaa"),
        "workerGroupSpecs[0].template.spec.containers[0].image: image Ray 2.59.0 != spec.rayClusterSpec.rayVersion"),
    "head and worker run different builds": (
        lambda d: _set_image(d, "RayService", None, SERVE_WORKER, "2.60.0-py311-cu128-bbbbbbbbbbbb"),
        "spec.rayClusterConfig.workerGroupSpecs[0]: image ghcr.io/e2e-llm/e2e-llm-serve:2.60.0-py311-cu128-bbbbbbbbbbbb"
        " != head image"),
    "image and rayVersion bumped together, the lock not": (
        lambda d: [_obj(d, "RayService")["spec"]["rayClusterConfig"].update(rayVersion="2.61.0"),
                   _set_image(d, "RayService", None, SERVE_WORKER, "2.61.0-py311-cu128-cccccccccccc"),
                   _set_image(d, "RayService", None, HEAD, "2.61.0-py311-cu128-cccccccccccc")],
        "image Ray 2.61.0 != ray==2.60.0 in the lock of ghcr.io/e2e-llm/e2e-llm-serve"),
    "GPU requests differ from limits": (
        lambda d: _container(d, "RayJob", "e2e-llm-train", TRAIN_WORKER)["resources"]["requests"].update(
            {"nvidia.com/gpu": "2"}),
        "containers[0].resources: nvidia.com/gpu requests 2 != limits 1"),
    "GPU requested without a limit": (
        lambda d: _container(d, "RayJob", "e2e-llm-batch", ["spec", "rayClusterSpec", "workerGroupSpecs", 0,
                                                             "template", "spec"])["resources"]["limits"].pop(
            "nvidia.com/gpu"),
        "nvidia.com/gpu requests 1 != limits 0"),
    "GPU worker group without GPUs": (
        lambda d: [_container(d, "RayJob", "e2e-llm-train", TRAIN_WORKER)["resources"][k].pop("nvidia.com/gpu")
                   for k in ("requests", "limits")],
        "RayJob/e2e-llm-train: spec.rayClusterSpec.workerGroupSpecs[0].template.spec: scheduled on GPU nodes"),
    "Serve asks for an accelerator the workers are not on": (
        lambda d: _serve_llm(d, lambda llm: llm.update(accelerator_type="H100")),
        "llm_configs[0].accelerator_type: H100 needs a GPU worker group with nodeSelector"),
    "Serve accelerator unknown to deploy.yaml": (
        lambda d: _serve_llm(d, lambda llm: llm.update(accelerator_type="A100")),
        "accelerator_type: 'A100' has no node selector in configs/deploy.yaml"),
    "serve workers moved to other nodes": (
        lambda d: _get(_obj(d, "RayService"), SERVE_WORKER)["nodeSelector"].update(
            {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
        "accelerator_type: L4 needs a GPU worker group with nodeSelector"),
    "autoscaling beyond the worker groups' GPUs": (
        lambda d: _serve_llm(d, lambda llm: llm["deployment_config"]["autoscaling_config"].update(max_replicas=8)),
        "autoscaling_config.max_replicas: 8 x 1 GPU(s) = 8 > 4 GPUs the worker groups can hold"),
    "tensor parallelism larger than a worker pod": (
        lambda d: _serve_llm(d, lambda llm: llm["engine_kwargs"].update(tensor_parallel_size=2)),
        "a replica needs 2 GPUs on one node, the largest GPU worker pod has 1"),
    "entrypoint subcommand typo": (
        lambda d: _obj(d, "RayJob", "e2e-llm-train")["spec"].update(entrypoint="e2e-llm trian --profile cluster"),
        "RayJob/e2e-llm-train: spec.entrypoint: e2e-llm has no subcommand 'trian'"),
    "entrypoint profile that does not exist": (
        lambda d: _obj(d, "RayJob", "e2e-llm-batch")["spec"].update(
            entrypoint="e2e-llm batch --profile clusterr --adapter latest"),
        "spec.entrypoint: --profile clusterr: no file"),
    "entrypoint flag the subcommand does not take": (
        lambda d: _obj(d, "RayJob", "e2e-llm-batch")["spec"].update(
            entrypoint="e2e-llm batch --profile cluster --adaptor latest"),
        "unrecognized arguments: --adaptor latest"),
    "entrypoint with an unclosed quote": (
        lambda d: _obj(d, "RayJob", "e2e-llm-train")["spec"].update(entrypoint='e2e-llm train --profile "cluster'),
        "does not parse as a command line"),
    "entrypoint that is not the CLI": (
        lambda d: _obj(d, "RayJob", "e2e-llm-train")["spec"].update(entrypoint="python train.py"),
        "'python train.py' does not run the e2e-llm CLI"),
    "shared volume claim renamed in one pod": (
        lambda d: _get(_obj(d, "RayService"), SERVE_WORKER)["volumes"][0]["persistentVolumeClaim"].update(
            claimName="e2e-llm-shard"),
        "volumes[0]: PersistentVolumeClaim 'e2e-llm-shard' is neither in the build nor declared external"),
    "service account typo": (
        lambda d: _get(_obj(d, "RayJob", "e2e-llm-train"), TRAIN_WORKER).update(serviceAccountName="e2e-lm"),
        "serviceAccountName: ServiceAccount 'e2e-lm' is neither in the build"),
    "API key Secret name typo": (
        lambda d: next(e for e in _container(d, "RayService", None, HEAD)["env"] if "valueFrom" in e
                       and e["valueFrom"]["secretKeyRef"]["name"] == "e2e-llm-api-key")["valueFrom"][
            "secretKeyRef"].update(name="e2e-llm-apikey"),
        "Secret 'e2e-llm-apikey' is neither in the build"),
    "ConfigMap volume that nothing creates": (
        lambda d: _get(_obj(d, "RayService"), HEAD)["volumes"].append(
            {"name": "extra", "configMap": {"name": "llm-extra-config"}}),
        "ConfigMap 'llm-extra-config' is neither in the build"),
    "image pull secret typo": (
        lambda d: _get(_obj(d, "RayJob", "e2e-llm-batch"), ["spec", "rayClusterSpec", "headGroupSpec", "template",
                                                             "spec"])["imagePullSecrets"][0].update(name="ghcr"),
        "imagePullSecrets[0]: Secret 'ghcr' is neither in the build"),
    "PodMonitor field misspelt": (
        lambda d: _obj(d, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(intervall="15s"),
        "PodMonitor/llm-ray-metrics: spec.podMetricsEndpoints[0]: Additional properties are not allowed"),
    "PodMonitor interval not a duration": (
        lambda d: _obj(d, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds"),
        "spec.podMetricsEndpoints[0].interval: '15 seconds' does not match"),
    "serving cluster moved to aarch64 images, its pods left on amd64 nodes": (
        lambda d: [_set_image(d, "RayService", None, path, "2.60.0-py311-cu128-aarch64-dddddddddddd")
                   for path in (HEAD, SERVE_WORKER)],
        "RayService/e2e-llm: spec.rayClusterConfig.headGroupSpec.template.spec: requires kubernetes.io/arch "
        "['amd64'], but ghcr.io/e2e-llm/e2e-llm-serve:2.60.0-py311-cu128-aarch64-dddddddddddd is built for "
        "aarch64 (arm64)"),
    "a pod that may land on nodes of any machine": (
        lambda d: _get(_obj(d, "RayJob", "e2e-llm-train"), ["spec", "submitterPodTemplate", "spec"])[
            "nodeSelector"].pop("kubernetes.io/arch"),
        "RayJob/e2e-llm-train: spec.submitterPodTemplate.spec.nodeSelector: no kubernetes.io/arch: amd64"),
    "a kind no schema checks": (
        lambda d: d.append({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                            "metadata": {"name": "llm"}, "spec": {"parentRefs": [{"name": "gw"}]}}),
        "HTTPRoute/llm: no schema validates gateway.networking.k8s.io/v1 HTTPRoute"),
}


def test_the_mutation_table_is_large_enough():
    assert len(MUTATIONS) >= 15


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_committed_builds_pass_the_cross_object_checks(env):
    assert problems(built()[env]) == []


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_each_realistic_mistake_in_the_prod_build_is_caught(name):
    mutate, message = MUTATIONS[name]
    docs = built()["prod"]
    mutate(docs)
    found = problems(docs)
    assert any(message in p for p in found), f"{name}: expected {message!r} in\n" + "\n".join(found)


def test_an_overlay_images_bump_that_leaves_ray_version_behind_is_caught(tmp_path):
    """A real kustomize build: a new overlay bumps the serve image to Ray 2.61 with `images:`."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    overlay = tmp_path / "k8s/overlays/bump"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../prod"],
        "images": [{"name": "ghcr.io/e2e-llm/e2e-llm-serve", "newTag": "2.61.0-py311-cu128-dddddddddddd"}]}))
    docs = kustomize_build(overlay)
    found = problems(docs)
    assert any("RayService/e2e-llm: spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].image: "
               "image Ray 2.61.0 != spec.rayClusterConfig.rayVersion 2.60.0" in p for p in found), found
    assert any("RayJob/e2e-llm-batch" in p and "rayVersion 2.60.0" in p for p in found), found


def test_the_ladder_runs_the_cross_object_checks(tmp_path):
    from manifest_cache import crd_dir

    docs = built()["prod"]
    _obj(docs, "RayJob", "e2e-llm-train")["spec"]["entrypoint"] = "e2e-llm trian --profile cluster"
    found = validate_documents(docs, crd_dir(), where="overlay prod", context=_context())
    assert any(p.startswith("overlay prod: RayJob/e2e-llm-train: spec.entrypoint: e2e-llm has no subcommand")
               for p in found), found


def test_external_objects_are_the_secrets_named_in_deploy_yaml():
    external = deploy().external_objects()
    assert external == {("Secret", "hf-token"), ("Secret", "aws-credentials"), ("Secret", "e2e-llm-api-key"),
                        ("Secret", "ghcr-pull")}


def test_validate_without_the_shared_crds_says_where_they_go_and_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("E2E_LLM_ROOT", str(ROOT))
    assert cli.main(["validate", "--shared", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "expected ray.io_rayjobs.yaml" in err and str(tmp_path / "nowhere/k8s/crds/kuberay-v1.7.0") in err
    assert "git clone --depth 1 --branch v1.7.0 https://github.com/ray-project/kuberay" in err
    assert "Traceback" not in err and str(SHARED) != str(tmp_path)
