# SPDX-License-Identifier: Apache-2.0
"""The offline validation ladder (`make validate`) on the committed tree, and one deliberately
broken manifest per rule that must be rejected with a message naming the field."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT
from manifest_cache import built, crd_dir, find, ladder_report

from e2e_llm.validate import (
    check_anyscale,
    check_cel,
    check_core_objects,
    check_crd_schema,
    check_no_secrets,
    check_operator_rules,
    check_serve_config,
    lint_yaml,
    validate_documents,
)

STEPS = ["render drift", "yamllint", "kustomize", "manifests", "anyscale", "secrets and pins", "containerfiles"]


@pytest.mark.parametrize("step", STEPS)
def test_ladder_step_is_clean_on_the_committed_tree(step):
    report = ladder_report()
    assert set(report) == set(STEPS)
    assert report[step] == [], "\n".join(report[step])


def test_every_overlay_builds_with_the_expected_objects():
    envs = built()
    assert set(envs) == {"dev", "prod"}
    for env, docs in envs.items():
        kinds = sorted(d["kind"] for d in docs)
        expected = ["Namespace", "PersistentVolumeClaim", "RayJob", "RayJob", "RayService", "ServiceAccount"]
        if env == "prod":
            expected += ["ConfigMap", "PodMonitor"]
        assert kinds == sorted(expected), env
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == f"e2e-llm-{env}", (env, doc["kind"])
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"], (env, doc["kind"])


def test_prod_overlay_sets_incremental_upgrade_strategy_and_dev_does_not():
    prod = find(built()["prod"], "RayService")
    assert prod["spec"]["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
    assert prod["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert "upgradeStrategy" not in find(built()["dev"], "RayService")["spec"]
    # The component patches the RayService without dropping what the base renders.
    assert prod["spec"]["serveConfigV2"] == find(built()["dev"], "RayService")["spec"]["serveConfigV2"]


def test_dev_overlay_patches_stay_small():
    dev_job = find(built()["dev"], "RayJob", "e2e-llm-train")
    prod_job = find(built()["prod"], "RayJob", "e2e-llm-train")
    assert dev_job["spec"]["ttlSecondsAfterFinished"] < prod_job["spec"]["ttlSecondsAfterFinished"]
    assert dev_job["spec"]["rayClusterSpec"] == prod_job["spec"]["rayClusterSpec"]


# -- negative cases: each broken manifest is rejected, naming the field ---------------------


def _rayservice():
    return find(built()["prod"], "RayService")


def _rayjob():
    return find(built()["prod"], "RayJob", "e2e-llm-train")


def _set(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()
UPGRADE = ["spec", "upgradeStrategy", "clusterUpgradeOptions"]
WORKER0 = ["spec", "rayClusterSpec", "workerGroupSpecs", 0]

BROKEN = {
    # 3. CRD schema, unknown fields rejected
    "unknown field (typo)": (_rayjob, ["spec", "rayClusterSpec", "headGroupSpec", "rayStartParam"], {},
                             "spec.rayClusterSpec.headGroupSpec.rayStartParam: unknown field"),
    "wrong type": (_rayjob, [*WORKER0, "replicas"], "four",
                   "spec.rayClusterSpec.workerGroupSpecs[0].replicas: 'four' is not of type 'integer'"),
    "int32 overflow": (_rayjob, ["spec", "ttlSecondsAfterFinished"], 2**31,
                       "spec.ttlSecondsAfterFinished: 2147483648 is greater than the maximum"),
    "unknown container field": (_rayjob, [*WORKER0, "template", "spec", "containers", 0, "imagePullPolcy"], "Always",
                                "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolcy"),
    "required field missing": (_rayservice, UPGRADE + ["gatewayClassName"], _DELETE,
                               "'gatewayClassName' is a required property"),
    # 3. CEL rules of the CRD
    "CEL managedBy": (_rayjob, ["spec", "managedBy"], "someone-else",
                      "spec.managedBy: the managedBy field value must be either"),
    "CEL deletionStrategy": (_rayjob, ["spec", "deletionStrategy"], {"onSuccess": {"policy": "DeleteCluster"}},
                             "spec.deletionStrategy: deletionStrategy requires either BOTH onSuccess and onFailure"),
    # 4. operator reconcile-time rules
    "upgradeStrategy.type unknown": (_rayservice, ["spec", "upgradeStrategy", "type"], "Canary",
                                     "spec.upgradeStrategy.type: 'Canary' is not one of"),
    "submissionMode unknown": (_rayjob, ["spec", "submissionMode"], "K8sMode",
                               "spec.submissionMode: 'K8sMode' is not one of"),
    "step above surge": (_rayservice, UPGRADE + ["stepSizePercent"], 50,
                         "clusterUpgradeOptions.stepSizePercent: 50 exceeds maxSurgePercent 20"),
    "incremental without autoscaler": (_rayservice, ["spec", "rayClusterConfig", "enableInTreeAutoscaling"], False,
                                       "spec.rayClusterConfig.enableInTreeAutoscaling: must be true"),
    "incremental without gateway": (_rayservice, UPGRADE + ["gatewayClassName"], "",
                                    "clusterUpgradeOptions.gatewayClassName: required"),
    "ttl without shutdown": (_rayjob, ["spec", "shutdownAfterJobFinishes"], False,
                             "spec.ttlSecondsAfterFinished: only valid with shutdownAfterJobFinishes: true"),
    "duplicate worker group": (_rayservice, ["spec", "rayClusterConfig", "workerGroupSpecs"], "DUPLICATE",
                               "workerGroupSpecs[1].groupName: duplicate worker group name"),
    "token auth on old Ray": (_rayjob, ["spec", "rayClusterSpec", "rayVersion"], "2.50.0",
                              "spec.rayClusterSpec.rayVersion: authOptions.mode 'token' needs Ray >= 2.52.0"),
    "name too long": (_rayjob, ["metadata", "name"], "e2e-llm-" + "x" * 50,
                      "metadata.name: must be a DNS-1035 label of at most 47 characters"),
    "pre-running deadline not positive": (_rayjob, ["spec", "preRunningDeadlineSeconds"], 0,
                                          "spec.preRunningDeadlineSeconds: must be a positive integer"),
    # 4c. the pods KubeRay creates, at the Pod Security level "restricted"
    "default submitter pod": (_rayjob, ["spec", "submitterPodTemplate"], _DELETE,
                              "submitter pod (KubeRay's default template: set spec.submitterPodTemplate): "
                              "spec.imagePullSecrets: pulls its image without the head's ghcr-pull"),
    "submitter without seccomp": (_rayjob, ["spec", "submitterPodTemplate", "spec", "securityContext"], _DELETE,
                                  "submitter pod: spec.containers[ray-job-submitter].securityContext.seccompProfile"),
    "privileged worker": (_rayjob, [*WORKER0, "template", "spec", "containers", 0, "securityContext", "privileged"],
                          True, "spec.containers[ray-worker].securityContext.privileged: must be unset or false"),
    "worker may escalate (init container too)": (
        _rayjob, [*WORKER0, "template", "spec", "containers", 0, "securityContext", "allowPrivilegeEscalation"], True,
        "spec.initContainers[wait-gcs-ready].securityContext.allowPrivilegeEscalation: must be false"),
    "autoscaler without securityContext": (_rayservice, ["spec", "rayClusterConfig", "autoscalerOptions"], _DELETE,
                                           "head pod: spec.containers[autoscaler].securityContext.capabilities.drop"),
    "hostPath volume": (_rayjob, [*WORKER0, "template", "spec", "volumes", 0],
                        {"name": "shared", "hostPath": {"path": "/data"}},
                        "spec.volumes[shared].hostPath: not allowed (baseline)"),
    # 4. Serve config through Ray's schema + imports
    "import_path does not import": (_rayservice, ["spec", "serveConfigV2"], "IMPORT",
                                    "import_path 'e2e_llm.nope:build_app' does not import"),
    "serveConfigV2 schema": (_rayservice, ["spec", "serveConfigV2"], "applications:\n  - name: llm\n",
                             "spec.serveConfigV2.applications[0].import_path: Field required"),
    "LLMConfig field": (_rayservice, ["spec", "serveConfigV2"], "LLMCONFIG", "args.llm_configs[0]"),
    # 5. core objects, strictly
    "pod env typo": (_rayjob, [*WORKER0, "template", "spec", "containers", 0, "env", 0, "valueFromm"], {},
                     ("spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].env[0]: "
                     "Additional properties are not allowed ('valueFromm' was unexpected)")),
    # 7. secrets and pins
    "literal secret value": (_rayjob, [*WORKER0, "template", "spec", "containers", 0, "env", 0],
                             {"name": "HF_TOKEN", "value": "hf_abcdefghijklmnopqrstuvwxyz"},
                             "HF_TOKEN carries a literal value"),
    "latest image": (_rayjob, [*WORKER0, "template", "spec", "containers", 0, "image"],
                     "ghcr.io/e2e-llm/e2e-llm-train:latest",
                     "image 'ghcr.io/e2e-llm/e2e-llm-train:latest' has no pinned tag"),
}


def _special(doc, path, value):
    if value == "DUPLICATE":
        groups = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        groups.append(dict(groups[0]))
        return doc
    if value == "IMPORT":
        broken = doc["spec"]["serveConfigV2"].replace("e2e_llm.serve:build_app", "e2e_llm.nope:build_app")
        return _set(doc, path, broken)
    if value == "LLMCONFIG":
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        config["applications"][0]["args"]["llm_configs"][0]["model_loading_confg"] = {}
        return _set(doc, path, yaml.safe_dump(config))
    return _set(doc, path, value)


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_manifest_is_rejected_naming_the_field(case):
    make, path, value, expected = BROKEN[case]
    doc = _special(make(), path, value)
    problems = validate_documents([doc], crd_dir())
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in:\n" + "\n".join(problems)


def test_at_least_ten_negative_cases_cover_every_rung():
    assert len(BROKEN) >= 10


def test_the_unbroken_documents_pass_each_check():
    for doc in (_rayjob(), _rayservice()):
        assert check_crd_schema(doc, crd_dir()) == []
        assert check_cel(doc, crd_dir()) == []
        assert check_operator_rules(doc) == []
    assert check_serve_config(_rayservice()) == []
    assert check_core_objects(built()["prod"]) == []


def test_cel_update_rules_are_skipped_not_failed():
    # managedBy has `self == oldSelf` (update-only) next to a create-time rule.
    doc = _set(_rayjob(), ["spec", "managedBy"], "ray.io/kuberay-operator")
    assert check_cel(doc, crd_dir()) == []


def test_core_object_with_unknown_field_is_rejected():
    pvc = find(built()["prod"], "PersistentVolumeClaim")
    pvc["spec"]["storageClass"] = "fast"
    problems = check_core_objects([pvc])
    assert problems and "PersistentVolumeClaim/e2e-llm-shared: spec" in problems[0] and "storageClass" in problems[0]


def test_secret_with_values_is_rejected():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": "x"}}
    assert any("Secret with values" in p for p in check_no_secrets(yaml.safe_dump(secret), "overlay.yaml"))


@pytest.mark.parametrize("line, expected", [
    ("image: rayproject/ray:latest", "`latest` tag"),
    ("token: CHANGE_ME", "placeholder value 'CHANGE_ME'"),
    ("key: AKIAABCDEFGHIJKLMNOP", "looks like a real credential"),
    ("working_dir: https://github.com/org/repo/archive/main.zip", "unpinned archive"),
    ("pip: [git+https://github.com/hiyouga/LLaMA-Factory.git]", "unpinned archive"),
])
def test_placeholders_tokens_latest_and_unpinned_archives_are_rejected(line, expected):
    problems = check_no_secrets(line + "\n", "x.yaml")
    assert any(expected in p and p.startswith("x.yaml:1") for p in problems), problems


def test_pinned_archives_pass():
    text = "pip: [git+https://github.com/hiyouga/LLaMA-Factory.git@ac8c6fdd3ab7fb6372f231f238e6b8ba6a17eb16]\n"
    assert check_no_secrets(text, "x.yaml") == []


def test_yamllint_names_file_line_and_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a:\n   b: 1\n  c: 2\n")
    problems = lint_yaml([bad], ROOT / ".yamllint")
    assert problems and problems[0].startswith(f"{bad}:")
    assert "(indentation)" in " ".join(problems) or "syntax" in " ".join(problems)


@pytest.mark.parametrize("rel", ["jobs/train.yaml", "jobs/batch.yaml", "services/llm.yaml"])
def test_anyscale_yamls_load_through_the_sdk(rel):
    assert check_anyscale(ROOT / rel) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(max_retries="two"), "'max_retries' must be an int"),
    (lambda d: d.update(entry_point=d.pop("entrypoint")), "entry_point"),
    (lambda d: d.update(image_uri="not a uri!"), "image_uri"),
])
def test_broken_anyscale_job_is_rejected_naming_the_field(tmp_path, mutate, expected):
    data = yaml.safe_load((ROOT / "jobs/train.yaml").read_text())
    mutate(data)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    problems = check_anyscale(path)
    assert problems and expected in problems[0], problems


def test_anyscale_service_import_path_is_checked(tmp_path):
    data = yaml.safe_load((ROOT / "services/llm.yaml").read_text())
    data["applications"][0]["import_path"] = "e2e_llm.serve:no_such_builder"
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(data))
    assert any("import_path 'e2e_llm.serve:no_such_builder' does not import" in p for p in check_anyscale(path))


def test_strict_schema_handles_the_kubernetes_extensions():
    from jsonschema import Draft7Validator

    from e2e_llm.validate import strict_schema

    validator = Draft7Validator(strict_schema({"type": "object", "properties": {
        "port": {"x-kubernetes-int-or-string": True},
        "name": {"type": "string", "nullable": True},
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "n": {"type": "integer", "format": "int32"},
    }}))
    assert not list(validator.iter_errors({"port": "http", "name": None, "free": {"anything": 1}, "n": 5}))
    assert not list(validator.iter_errors({"port": 8080}))
    messages = [e.message for e in validator.iter_errors({"port": 1.5, "n": -(2**31) - 1, "typo": 1})]
    assert any("'typo' was unexpected" in m for m in messages)
    assert any("is less than the minimum" in m for m in messages)
    assert any("1.5 is not valid under any of the given schemas" in m for m in messages)


# -- Pod Security: the namespaces enforce "restricted", the ladder checks at their level ----


def test_every_overlay_namespace_enforces_the_restricted_pod_security_standard():
    from e2e_llm.validate_pod_security import namespace_levels

    for env, docs in built().items():
        assert namespace_levels(docs) == {f"e2e-llm-{env}": "restricted"}, env


def test_pods_are_checked_at_the_level_their_namespace_enforces():
    namespace = find(built()["dev"], "Namespace")
    job = _set(_rayjob(), ["spec", "submitterPodTemplate", "spec", "securityContext"], {"runAsNonRoot": True})
    restricted = validate_documents([namespace, job], crd_dir())
    assert any("submitter pod: spec.containers[ray-job-submitter].securityContext.seccompProfile" in p
               for p in restricted), restricted
    namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "baseline"
    assert validate_documents([namespace, job], crd_dir()) == []  # seccomp is a "restricted" rule only
    hostpath = _set(job, [*WORKER0, "template", "spec", "volumes", 0], {"name": "shared", "hostPath": {"path": "/x"}})
    assert any("hostPath: not allowed (baseline)" in p for p in validate_documents([namespace, hostpath], crd_dir()))


def test_an_unknown_pod_security_level_is_named_and_the_pods_held_to_restricted():
    namespace = find(built()["dev"], "Namespace")
    namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = "restrcted"
    job = _set(_rayjob(), ["spec", "submitterPodTemplate", "spec", "securityContext"], {"runAsNonRoot": True})
    problems = validate_documents([namespace, job], crd_dir())
    assert ("Namespace/e2e-llm-dev: metadata.labels.pod-security.kubernetes.io/enforce: 'restrcted' is not one of "
            "privileged, baseline, restricted") in problems
    assert any("submitter pod: spec.containers[ray-job-submitter].securityContext.seccompProfile" in p
               for p in problems), problems
