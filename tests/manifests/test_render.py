# SPDX-License-Identifier: Apache-2.0
"""`e2e-llm render`: one config, two targets, committed and drift-checked."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from conftest import ROOT
from manifest_cache import built, cluster_config, deploy, find, rendered

from e2e_llm import cli
from e2e_llm.config import ConfigError
from e2e_llm.deploy import load_deploy
from e2e_llm.pins import lock_pins
from e2e_llm.render import RENDERED_DIRS, check, write
from e2e_llm.render_common import HEADER


def _yaml(rel: str):
    return yaml.safe_load(rendered()[rel])


def test_committed_files_match_a_fresh_render(tmp_path):
    write(rendered(), tmp_path)
    for rel in rendered():
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is not committed: run `make render`"
        assert committed.read_text(encoding="utf-8") == (tmp_path / rel).read_text(encoding="utf-8"), (
            f"{rel} drifted from configs/: run `make render` and commit")
    assert check(rendered(), ROOT) == []


def test_render_check_lists_drifted_and_stale_files_and_fails(tmp_path, monkeypatch, capsys):
    for folder in RENDERED_DIRS:
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / "services/llm.yaml").write_text("# edited by hand\n")
    (tmp_path / "k8s/base/leftover.yaml").write_text("kind: ConfigMap\n")
    monkeypatch.setenv("E2E_LLM_ROOT", str(ROOT))
    assert cli.main(["render", "--check", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "services/llm.yaml" in err and "k8s/base/leftover.yaml" in err
    assert "jobs/train.yaml" not in err
    # A render fixes both, and the check passes again.
    assert cli.main(["render", "--output", str(tmp_path)]) == 0
    assert cli.main(["render", "--check", "--output", str(tmp_path)]) == 0


def test_every_rendered_file_starts_with_the_generated_header():
    for rel, text in rendered().items():
        assert text.splitlines()[0] == HEADER, rel
        assert text.splitlines()[1].startswith("# "), f"{rel}: second line should say what the file is"


@pytest.mark.parametrize("stage, expected", [
    ("train", "e2e-llm train --profile cluster"),
    ("batch", "e2e-llm batch --profile cluster --adapter latest"),
])
def test_job_entrypoint_is_identical_for_anyscale_and_kuberay(stage, expected):
    anyscale = _yaml(f"jobs/{stage}.yaml")
    rayjob = _yaml(f"k8s/base/rayjob-{stage}.yaml")
    assert anyscale["entrypoint"] == rayjob["spec"]["entrypoint"] == expected


def test_serve_application_is_identical_in_anyscale_service_and_serve_config_v2():
    from e2e_llm.serve import app_args

    service = _yaml("services/llm.yaml")
    serve_config = yaml.safe_load(_yaml("k8s/base/rayservice-llm.yaml")["spec"]["serveConfigV2"])
    assert service["applications"] == serve_config["applications"]
    (app,) = service["applications"]
    assert app["import_path"] == "e2e_llm.serve:build_app"
    assert app["args"] == app_args(cluster_config())


def test_ray_version_is_derived_from_the_image_tag_and_matches_locks_and_containerfiles():
    images = deploy().images
    assert images.train.ray_version == images.serve.ray_version
    for env in ("train", "serve"):
        assert lock_pins(ROOT / f"images/{env}/requirements.lock")["ray"] == images.train.ray_version
    for rel in ("k8s/base/rayjob-train.yaml", "k8s/base/rayjob-batch.yaml"):
        assert _yaml(rel)["spec"]["rayClusterSpec"]["rayVersion"] == images.train.ray_version
    assert _yaml("k8s/base/rayservice-llm.yaml")["spec"]["rayClusterConfig"]["rayVersion"] == images.serve.ray_version
    for containerfile in ROOT.glob("images/*/Containerfile*"):
        base = next(line for line in containerfile.read_text().splitlines() if line.startswith("FROM "))
        assert base.split(":", 1)[1].startswith(images.train.ray_version + "-"), containerfile


def test_worker_groups_follow_the_profile():
    config, dep = cluster_config(), deploy()
    train = _yaml("k8s/base/rayjob-train.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert train["replicas"] == train["minReplicas"] == train["maxReplicas"] == config.train.num_workers
    limits = train["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == str(int(config.train.resources_per_worker["GPU"]))
    assert limits["cpu"] == str(int(config.train.resources_per_worker["CPU"]))
    assert train["template"]["spec"]["nodeSelector"] == {
        "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        **dep.accelerators[config.train.accelerator_type].node_selector}

    serve = _yaml("k8s/base/rayservice-llm.yaml")["spec"]["rayClusterConfig"]
    group = serve["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (config.serve.min_replicas, config.serve.max_replicas)
    assert serve["enableInTreeAutoscaling"] is True  # replicas vary, so Ray must add pods
    anyscale = _yaml("services/llm.yaml")["compute_config"]["worker_nodes"][0]
    assert (anyscale["min_nodes"], anyscale["max_nodes"]) == (config.serve.min_replicas, config.serve.max_replicas)
    assert anyscale["required_resources"]["accelerator"] == config.serve.accelerator_type


def test_secrets_are_referenced_by_name_only():
    config, dep = cluster_config(), deploy()
    rayservice = _yaml("k8s/base/rayservice-llm.yaml")
    container = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == dep.secrets.hf_token.name
    assert env[config.serve.auth.api_key_env]["valueFrom"]["secretKeyRef"] == {
        "name": dep.secrets.api_key.name, "key": dep.secrets.api_key.key}
    assert container["envFrom"] == [{"secretRef": {"name": dep.secrets.aws.name, "optional": True}}]
    assert all("value" not in e for e in container["env"] if e["name"] in ("HF_TOKEN", config.serve.auth.api_key_env))
    for rel, text in rendered().items():
        assert "kind: Secret" not in text, rel


def test_every_pod_runs_as_the_bundle_identity_and_the_submitter_pulls_like_the_head():
    """Every pod template (Ray nodes and the RayJob submitter) runs under the bundle's service
    account and pull secret with the restricted security context; the submitter (KubeRay's
    default has none of these) uses the head's image."""
    from e2e_llm.render_kuberay import CONTAINER_SECURITY_CONTEXT, POD_SECURITY_CONTEXT

    dep = deploy()
    for rel in ("k8s/base/rayjob-train.yaml", "k8s/base/rayjob-batch.yaml", "k8s/base/rayservice-llm.yaml"):
        doc = _yaml(rel)
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or spec["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        if doc["kind"] == "RayJob":
            assert spec["preRunningDeadlineSeconds"] == dep.jobs.start_timeout_s < spec["activeDeadlineSeconds"]
            submitter = spec["submitterPodTemplate"]
            assert submitter["spec"]["containers"][0]["image"] == \
                cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
            assert submitter["spec"]["restartPolicy"] == "Never"
            assert "command" not in submitter["spec"]["containers"][0]  # KubeRay writes `ray job submit`
            templates.append(submitter)
        for template in templates:
            pod = template["spec"]
            assert pod["serviceAccountName"] == dep.name, rel
            assert pod["imagePullSecrets"] == [{"name": dep.secrets.registry.kubernetes}], rel
            assert pod["securityContext"] == POD_SECURITY_CONTEXT, rel
            assert [c["securityContext"] for c in pod["containers"]] == [CONTAINER_SECURITY_CONTEXT], rel
    prod = find(built()["prod"], "RayService")["spec"]["rayClusterConfig"]
    assert prod["autoscalerOptions"]["securityContext"] == CONTAINER_SECURITY_CONTEXT


def test_every_pod_selects_linux_nodes_of_its_images_machine(tmp_path):
    """Head, workers and the RayJob submitter select kubernetes.io/arch from the image tag (no
    suffix: amd64, rayproject's ``-aarch64``: arm64) and Linux, beside the accelerator's labels:
    on a cluster with Graviton (arm64) or Windows nodes a pod without them can land there."""
    from e2e_llm.render_kuberay import rayjob, rayservice
    from e2e_llm.validate_common import pod_templates

    for rel in ("k8s/base/rayjob-train.yaml", "k8s/base/rayjob-batch.yaml", "k8s/base/rayservice-llm.yaml"):
        templates = list(pod_templates(_yaml(rel)))
        assert len(templates) == (3 if "rayjob" in rel else 2)
        for _, template in templates:
            selector = template["spec"]["nodeSelector"]
            assert (selector["kubernetes.io/os"], selector["kubernetes.io/arch"]) == ("linux", "amd64"), rel

    def to_aarch64(data):
        for image in ("train", "serve"):
            data["images"][image]["tag"] += "-aarch64"  # rayproject/ray:2.60.0-py311-cu128-aarch64
    arm = load_deploy(_deploy_with(tmp_path, to_aarch64), root=ROOT)
    config = arm.pipeline()
    for doc in (rayjob(arm, config, "train"), rayjob(arm, config, "batch"), rayservice(arm, config)):
        for _, template in pod_templates(doc):
            assert template["spec"]["nodeSelector"]["kubernetes.io/arch"] == "arm64"
            assert re.search(r":2\.60\.0-py311-cu128-aarch64-[0-9a-f]{12}$", template["spec"]["containers"][0]["image"])
    assert re.search(r":2\.60\.0-py311-cpu-aarch64-[0-9a-f]{12}$", arm.image_ref("serve-cpu"))
    assert arm.images.serve.ray_version == "2.60.0"


def test_the_pods_group_matches_the_images_user():
    """fsGroup gives the images' user the shared volume: the group must be that user's (the
    rayproject/ray base image's `ray`, uid 1000, group `users`)."""
    from e2e_llm.render_kuberay import RAY_USER_GROUP

    for path in sorted((ROOT / "images").glob("*/Containerfile*")):
        users = re.findall(r"^USER (\S+)", path.read_text(), flags=re.M)
        assert users[-1] == "1000", path
        assert "FROM rayproject/ray:" in path.read_text(), path  # whose user 1000 is in group 100
    assert RAY_USER_GROUP == 100


def test_anyscale_service_uses_the_query_token_and_never_gets_the_app_key():
    # One bearer check per target: Anyscale's query token there (the app key is not in the
    # service's environment, so the app's check is off); the Secret-fed app key on KubeRay.
    config = cluster_config()
    service = _yaml("services/llm.yaml")
    assert service["query_auth_token_enabled"] is True and config.serve.auth.enabled
    key_env = config.serve.auth.api_key_env
    assert key_env not in service["env_vars"]
    for app in service["applications"]:
        for llm in app["args"]["llm_configs"]:
            assert key_env not in llm.get("runtime_env", {}).get("env_vars", {})


def test_canary_component_is_rendered_from_deploy_config():
    canary = deploy().service.canary
    patch = _yaml("k8s/components/canary/upgrade-strategy.yaml")
    options = patch["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]
    assert patch["spec"]["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
    assert options == {"stepSizePercent": canary.step_size_percent, "intervalSeconds": canary.interval_seconds,
                       "maxSurgePercent": canary.max_surge_percent, "gatewayClassName": canary.gateway_class_name}
    assert patch["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert _yaml("k8s/components/canary/kustomization.yaml")["kind"] == "Component"


def test_monitoring_component_carries_the_dashboard_and_pod_monitor():
    from e2e_llm.monitoring import grafana_dashboard

    configmap = _yaml("k8s/components/monitoring/grafana-dashboard.yaml")
    (data,) = configmap["data"].values()
    assert json.loads(data) == grafana_dashboard()
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert _yaml("k8s/components/monitoring/podmonitor.yaml")["kind"] == "PodMonitor"


# -- deploy config errors name the file, key and reason ------------------------------------


def _deploy_with(tmp_path, mutate):
    data = yaml.safe_load((ROOT / "configs/deploy.yaml").read_text())
    mutate(data)
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["images"]["train"].update(tag="latest"), r"images\.train\.tag: .*not pinned"),
    (lambda d: d["images"]["serve"].update(repository="ghcr.io/x/serve:1.0"), r"images\.serve\.repository: .*tag"),
    (lambda d: d["service"]["canary"].update(step_size_percent=50, max_surge_percent=20),
     r"service\.canary: .*step_size_percent \(50\) must be <= max_surge_percent \(20\)"),
    (lambda d: d["jobs"].update(submission_mode="K8sMode"), r"jobs\.submission_mode: Input should be"),
    (lambda d: d["jobs"].update(start_timeout_s=86400), r"jobs: .*start_timeout_s \(86400\) must be less than"),
    (lambda d: d["compute"]["head"].update(memory="32 gigs"), r"compute\.head\.memory: .*quantity"),
    (lambda d: d["secrets"]["hf_token"].update(value="hf_abc"), r"secrets\.hf_token\.value: unknown key"),
    (lambda d: d["accelerators"]["L4"]["node_selector"].update({"kubernetes.io/arch": "arm64"}),
     r"accelerators\.L4\.node_selector: .*kubernetes\.io/arch: every pod selects these from its image's tag"),
    (lambda d: d["images"]["serve"].update(tag="2.60.0-py311-cu128-arm64"), r"images\.serve\.tag: .*\[-aarch64\]"),
])
def test_deploy_config_errors_name_the_field(tmp_path, mutate, message):
    with pytest.raises(ConfigError, match=message):
        load_deploy(_deploy_with(tmp_path, mutate), root=ROOT)


def test_accelerator_used_by_the_profile_must_be_mapped(tmp_path):
    deploy_cfg = load_deploy(_deploy_with(tmp_path, lambda d: d["accelerators"].pop("L4")), root=ROOT)
    expected = r"accelerators: no entry for 'L4' \(profile cluster batch.accelerator_type\)"
    with pytest.raises(ConfigError, match=expected):
        deploy_cfg.pipeline()


def test_anyscale_service_without_query_token_is_rejected_while_auth_is_on(tmp_path):
    deploy_cfg = load_deploy(_deploy_with(tmp_path, lambda d: d["service"].update(query_auth_token_enabled=False)),
                             root=ROOT)
    expected = "service.query_auth_token_enabled: false would leave the Anyscale service open"
    with pytest.raises(ConfigError, match=expected):
        deploy_cfg.pipeline()


def test_serves_high_throughput_mode_reaches_every_pod_of_the_serving_cluster_only():
    from e2e_llm.render import anyscale_job, anyscale_service
    from e2e_llm.render_kuberay import rayjob, rayservice
    from e2e_llm.serve import HIGH_THROUGHPUT_ENV

    config, dep = cluster_config().model_copy(deep=True), deploy()

    def pod_env(spec):
        pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return [{e["name"]: e.get("value") for e in p["template"]["spec"]["containers"][0]["env"]} for p in pods]

    def has_mode(env):
        return all(env.get(k) == v for k, v in HIGH_THROUGHPUT_ENV.items())

    assert not any(has_mode(env) for env in pod_env(rayservice(dep, config)["spec"]["rayClusterConfig"]))  # off
    config.serve.high_throughput = True
    assert all(has_mode(env) for env in pod_env(rayservice(dep, config)["spec"]["rayClusterConfig"]))
    assert has_mode(anyscale_service(dep, config)["env_vars"])
    assert not any(has_mode(env) for env in pod_env(rayjob(dep, config, "train")["spec"]["rayClusterSpec"]))
    assert not has_mode(anyscale_job(dep, config, "batch")["env_vars"])
