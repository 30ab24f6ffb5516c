# SPDX-License-Identifier: Apache-2.0
"""Deploy operations without a cluster: Makefile guards, the image builder's engine
detection, preflight messages for missing credentials/cluster, and the GitOps workflows."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SHARED

from e2e_llm import cli
from e2e_llm.deploy import load_deploy
from e2e_llm.validate_common import CRD_FILES, KUBERAY_CRDS

BIN = Path(sys.executable).parent


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["train", "TARGET=gke"], "TARGET must be anyscale or k8s"),
    (["status", "DEPLOY_ENV=staging"], "DEPLOY_ENV must be dev or prod (got 'staging')"),
    (["status", "ENV=staging"], "DEPLOY_ENV must be dev or prod (got 'staging')"),
    (["deploy-service", "TARGET=k8s", "CANARY_PERCENT=10"], "CANARY_PERCENT is for TARGET=anyscale"),
    (["deploy-service", "CANARY_PERCENT=150"], "CANARY_PERCENT must be an integer from 0 to 100 (got '150')"),
    (["logs", "STAGE=eval"], "STAGE must be train, batch or serve (got 'eval')"),
    (["image"], "IMAGE must be train, serve or serve-cpu (got '')"),
])
def test_makefile_guards_stop_before_running_anything(args, message):
    result = _make(*args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, expected", [
    (["train", "TARGET=k8s", "DEPLOY_ENV=prod"],
     "kubectl apply --server-side -k k8s/overlays/prod -l 'app.kubernetes.io/component in (shared,train)'"),
    (["deploy-service", "TARGET=anyscale", "DEPLOY_ENV=prod", "CANARY_PERCENT=10"],
     "anyscale service deploy -f services/llm.yaml --name e2e-llm-prod"),
    (["rollback", "TARGET=anyscale", "DEPLOY_ENV=prod"], "anyscale service rollback -n e2e-llm-prod"),
    (["rollback", "TARGET=anyscale", "DEPLOY_ENV=prod", "REV=abc123"],
     "anyscale service deploy -f .cache/rollback/llm.yaml --name e2e-llm-prod"),
    (["batch", "TARGET=anyscale"], "anyscale job submit -f jobs/batch.yaml --name e2e-llm-batch-dev"),
    (["status", "TARGET=k8s"], "kubectl get rayjob,rayservice,raycluster -n e2e-llm-dev"),
    (["wait", "STAGE=serve", "TARGET=k8s", "DEPLOY_ENV=prod"], "e2e-llm wait-service --target k8s --env prod"),
    (["wait", "STAGE=train", "TARGET=k8s", "DEPLOY_ENV=prod"], "e2e-llm wait-job --stage train --env prod"),
    (["canary-engine", "TARGET=anyscale", "DEPLOY_ENV=prod", "PROMETHEUS_URL=http://p:9090"],
     "canary --profile cluster --platform anyscale --env prod --rev HEAD~1 --prometheus-url http://p:9090"),
    (["down", "TARGET=k8s", "DEPLOY_ENV=prod"], "kubectl delete -k k8s/overlays/prod"),
])
def test_deploy_targets_run_preflight_then_the_documented_command(args, expected):
    result = _make("-n", *args)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "e2e-llm preflight" in line or expected in line]
    assert "preflight --target" in lines[0] and any(expected in line for line in lines[1:]), result.stdout
    assert "--canary-percent 10" in result.stdout or "CANARY_PERCENT" not in " ".join(args)


@pytest.mark.parametrize("target, stage", [("e2e-train", "train"), ("serve", "serve"), ("e2e-serve", "serve")])
def test_local_ray_temp_dirs_are_this_users_own(target, stage):
    # Another user of the machine made /tmp/ray-e2e-serve first: Ray could not write in it.
    result = _make("-n", target, "ADAPTER=x")
    assert result.returncode == 0, result.stderr
    assert f"--ray-temp-dir /tmp/ray-e2e-{os.getuid()}-{stage}" in result.stdout, result.stdout


def test_posix_env_in_the_environment_is_not_the_deploy_environment():
    """ENV is the POSIX shell's startup file: set in the environment it must not break make."""
    env = {**os.environ, "ENV": "/root/.shrc"}
    for args in (["-n", "help"], ["-n", "status", "TARGET=k8s"]):
        result = subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "deprecated" not in result.stderr
    assert "-n e2e-llm-dev" in result.stdout  # the default DEPLOY_ENV, not /root/.shrc


def test_env_on_the_command_line_still_works_with_a_deprecation_warning():
    result = _make("-n", "status", "TARGET=k8s", "ENV=prod")
    assert result.returncode == 0, result.stderr
    assert "ENV=prod is deprecated" in result.stderr and "use DEPLOY_ENV=prod" in result.stderr
    assert "-n e2e-llm-prod" in result.stdout


def test_argument_checks_run_only_for_the_targets_that_need_them():
    assert _make("-n", "help", "TARGET=gke", "STAGE=eval", "DEPLOY_ENV=x").returncode == 0
    assert _make("-n", "render", "TARGET=gke").returncode == 0
    assert "TARGET must be" in _make("-n", "status", "TARGET=gke").stderr


def _fake_engine(tmp_path: Path, name: str, info_exit: int) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    # `manifest inspect` answers "not in the registry" until a push happened, then a digest.
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/{name}.calls\n"
                      f"[ \"$1\" = info ] && exit {info_exit}\n"
                      f"[ \"$1\" = push ] && touch {tmp_path}/{name}.pushed\n"
                      f"if [ \"$1\" = manifest ]; then [ -f {tmp_path}/{name}.pushed ] || exit 1; "
                      "echo '{\"Descriptor\": {\"digest\": \"sha256:abc\"}}'; fi\nexit 0\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_image_without_any_engine_says_so_and_fails(tmp_path, monkeypatch, capsys):
    git = tmp_path / "git-only"
    git.mkdir()
    (git / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(git))  # neither docker nor podman (git: the image identity)
    monkeypatch.setenv("E2E_LLM_ROOT", str(ROOT))
    assert cli.main(["image", "--name", "serve-cpu"]) == 3
    err = capsys.readouterr().err
    assert "no container engine answers" in err and "docker: not installed" in err and "podman: not installed" in err


def test_image_skips_a_client_whose_daemon_does_not_answer(tmp_path, monkeypatch, capsys):
    bindir = _fake_engine(tmp_path, "docker", info_exit=1)
    _fake_engine(tmp_path, "podman", info_exit=0)
    monkeypatch.setenv("PATH", f"{bindir}:{Path(shutil.which('git')).parent}")  # git: the image identity
    monkeypatch.setenv("E2E_LLM_ROOT", str(ROOT))
    digest_file = tmp_path / "digest.json"
    assert cli.main(["image", "--name", "serve-cpu", "--push", "--digest-file", str(digest_file)]) == 0
    assert "build" not in (tmp_path / "docker.calls").read_text()
    calls = (tmp_path / "podman.calls").read_text().splitlines()
    image = load_deploy(root=ROOT).image_ref("serve-cpu")
    assert re.fullmatch(r"ghcr\.io/e2e-llm/e2e-llm-serve:2\.60\.0-py311-cpu-[0-9a-f]{12}", image)
    build = f"build --platform linux/amd64 -f images/serve/Containerfile.cpu -t {image} ."
    assert calls == ["info", f"manifest inspect {image}", build,
                     f"push {image}", f"manifest inspect --verbose {image}"]
    recorded = json.loads(digest_file.read_text())
    assert recorded == {"image": "serve-cpu", "ref": image, "digest": "ghcr.io/e2e-llm/e2e-llm-serve@sha256:abc"}
    # The same content again: the tag is in the registry, nothing is built or pushed over it.
    assert cli.main(["image", "--name", "serve-cpu", "--push"]) == 0
    again = (tmp_path / "podman.calls").read_text().splitlines()[len(calls):]
    assert not [c for c in again if c.startswith(("build", "push"))], again
    assert "never overwritten" in capsys.readouterr().out


def test_preflight_anyscale_names_the_missing_credentials(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("E2E_LLM_ROOT", str(ROOT))
    monkeypatch.delenv("ANYSCALE_CLI_TOKEN", raising=False)
    monkeypatch.delenv("E2E_LLM_API_KEY", raising=False)
    assert cli.main(["preflight", "--target", "anyscale", "--stage", "service"]) == 3
    err = capsys.readouterr().err
    assert "Anyscale credentials missing: set ANYSCALE_CLI_TOKEN" in err
    assert "E2E_LLM_API_KEY" not in err  # no app key on Anyscale: the query token guards the service
    monkeypatch.setenv("ANYSCALE_CLI_TOKEN", "from-ci-secret")
    assert cli.main(["preflight", "--target", "anyscale", "--stage", "service"]) == 0


def test_preflight_k8s_without_a_context_fails_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert cli.main(["preflight", "--target", "k8s", "--env", "dev"]) == 3
    assert "no Kubernetes context: set KUBECONFIG" in capsys.readouterr().err


def test_preflight_k8s_with_an_unreachable_cluster_fails_clearly(tmp_path, monkeypatch, capsys):
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:1"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "u"}}],
        "users": [{"name": "u", "user": {}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert cli.main(["preflight", "--target", "k8s", "--env", "prod"]) == 3
    assert "Kubernetes API of context nowhere unreachable or unauthorized" in capsys.readouterr().err


class FakeCluster:
    """Answers preflight's kubectl calls: CRDs present (KubeRay's v1.7 ones, or with the fields
    ``old_operator`` names left out), the given Secrets, StorageClasses, PVC."""

    def __init__(self, secrets=(), classes=(), pvc_phase=None, old_operator=None):
        self.secrets, self.classes, self.pvc_phase = set(secrets), list(classes), pvc_phase
        self.old_operator = old_operator or {}

    def __call__(self, kubectl, *args):
        ok = lambda out="": subprocess.CompletedProcess(args, 0, out, "")  # noqa: E731
        missing = subprocess.CompletedProcess(args, 1, "", 'Error from server (NotFound): "x" not found')
        if args[:2] == ("config", "current-context"):
            return ok("prod-cluster\n")
        if args[:2] == ("get", "crd"):
            kind = {"rayjobs.ray.io": "RayJob", "rayservices.ray.io": "RayService"}.get(args[2])
            if kind is None:
                return ok(json.dumps({"metadata": {"name": args[2]}}))
            crd = yaml.safe_load((SHARED / KUBERAY_CRDS / CRD_FILES[kind]).read_text())
            for field in self.old_operator.get(kind, ()):  # a KubeRay from before that field
                del crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][field]
            return ok(json.dumps(crd))
        if args[:2] == ("get", "secret"):
            return ok() if args[2] in self.secrets else missing
        if args[:2] == ("get", "pvc"):
            return ok(json.dumps({"status": {"phase": self.pvc_phase}})) if self.pvc_phase else missing
        if args[:2] == ("get", "storageclass"):
            return ok(json.dumps({"items": self.classes}))
        raise AssertionError(args)


def _class(name, provisioner, default=False):
    annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
    return {"metadata": {"name": name, "annotations": annotations}, "provisioner": provisioner}


@pytest.mark.parametrize("cluster, stage, lines", [
    (FakeCluster({"ghcr-pull", "e2e-llm-api-key"}, [_class("efs", "efs.csi.aws.com", default=True)]), "service", []),
    (FakeCluster({"ghcr-pull"}, [_class("efs", "efs.csi.aws.com", default=True)]), "service",
     ["Secret e2e-llm-api-key missing in namespace e2e-llm-prod: the service's API key"]),
    (FakeCluster({"ghcr-pull"}, [_class("efs", "efs.csi.aws.com", default=True)]), "train", []),
    (FakeCluster(set(), [_class("efs", "efs.csi.aws.com", default=True)]), "batch",
     ["Secret ghcr-pull missing in namespace e2e-llm-prod: image pull secret"]),
    (FakeCluster({"ghcr-pull"}, [_class("gp3", "ebs.csi.aws.com", default=True)]), "train",
     ["StorageClass gp3 (ebs.csi.aws.com) provides only ReadWriteOnce; the shared volume needs ReadWriteMany"]),
    (FakeCluster({"ghcr-pull"}, [_class("efs", "efs.csi.aws.com")]), "train",
     ["no default StorageClass and storage.volume.storage_class is null"]),
    (FakeCluster({"ghcr-pull"}, [_class("gp3", "ebs.csi.aws.com", default=True)], pvc_phase="Bound"), "train", []),
    # A KubeRay operator older than v1.7: its CRDs lack fields the manifests set.
    (FakeCluster({"ghcr-pull"}, [_class("efs", "efs.csi.aws.com", default=True)],
                 old_operator={"RayJob": ["preRunningDeadlineSeconds"]}), "train",
     ["RayJob/e2e-llm-train: spec.preRunningDeadlineSeconds: unknown field, in the cluster's rayjobs.ray.io CRD: "
      "its KubeRay is older than the v1.7"]),
    (FakeCluster({"ghcr-pull", "e2e-llm-api-key"}, [_class("efs", "efs.csi.aws.com", default=True)],
                 old_operator={"RayJob": ["preRunningDeadlineSeconds"], "RayService": ["upgradeStrategy"]}),
     "service", ["RayService/e2e-llm: spec.upgradeStrategy: unknown field, in the cluster's rayservices.ray.io CRD"]),
])
def test_preflight_k8s_checks_needed_secrets_and_a_storage_class_for_the_shared_volume(
        monkeypatch, capsys, cluster, stage, lines):
    from e2e_llm.commands import preflight

    monkeypatch.setenv("E2E_LLM_ROOT", str(ROOT))
    monkeypatch.setattr(preflight, "_kubectl", cluster)
    monkeypatch.setattr(preflight, "find_tool", lambda name: f"/usr/bin/{name}")
    code = cli.main(["preflight", "--target", "k8s", "--env", "prod", "--stage", stage])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("preflight (k8s, prod): ")]
    assert code == (3 if lines else 0)
    assert len(err) == len(lines), err  # one clear line per problem
    for line, expected in zip(err, lines, strict=True):
        assert expected in line, (line, expected)


# -- GitOps workflows ----------------------------------------------------------------------

WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yaml"))


def test_workflows_validate_against_the_github_schema():
    assert [w.name for w in WORKFLOWS] == ["deploy.yaml", "pr.yaml"]
    result = subprocess.run([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows",
                             *map(str, WORKFLOWS)], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_actions_are_pinned_by_sha_and_permissions_minimal(path):
    text = path.read_text()
    uses = re.findall(r"uses: (\S+)(.*)", text)
    assert uses
    for ref, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), f"{ref}: pin a full commit SHA"
        assert re.search(r"# v\d+\.\d+\.\d+", comment), f"{ref}: add the version as a comment"
    workflow = yaml.safe_load(text)
    assert workflow["permissions"] == {"contents": "read"}
    for name, job in workflow["jobs"].items():
        extra = {k: v for k, v in job.get("permissions", {}).items() if k != "contents"}
        assert set(extra) <= {"packages", "id-token"}, f"{name}: {extra}"
        assert job.get("permissions", {}).get("contents", "read") == "read"


def test_workflow_secrets_are_references_only():
    for path in WORKFLOWS:
        for value in re.findall(r"secrets\.(\w+)", path.read_text()):
            assert value.isupper() or value == "GITHUB_TOKEN"
        assert not re.search(r"(token|key|password):\s*['\"]?[A-Za-z0-9_\-]{16,}", path.read_text(), re.IGNORECASE)


def test_readme_deploy_commands_are_real_make_targets():
    targets = set(re.findall(r"^([a-z-]+):.*##", (ROOT / "Makefile").read_text(), re.MULTILINE))
    section = (ROOT / "README.md").read_text().split("## Deploy", 1)
    assert len(section) == 2, "README has no Deploy section"
    used = set(re.findall(r"make ([a-z-]+)", section[1].split("\n## ", 1)[0]))
    assert used and used <= targets, used - targets
