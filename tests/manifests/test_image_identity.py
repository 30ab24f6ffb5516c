# SPDX-License-Identifier: Apache-2.0
"""Content-addressed images: a code-only change changes the image every rendered spec names,
and rolling back to a revision brings that revision's image back (offline, in a temp git repo)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from e2e_llm.deploy import load_deploy
from e2e_llm.images import ImageIdentityError, copied_paths, image_identity, tree_of
from e2e_llm.render import render_files, write

PROJECT = ["src", "configs", "images", "pyproject.toml", "README.md", ".gitignore", "Makefile", "k8s/overlays"]
IMAGE_LINE = re.compile(r"^\s*(?:- )?(image|image_uri): (\S+)$", re.M)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _render(repo: Path) -> dict[str, str]:
    files = render_files(load_deploy(root=repo))
    write(files, repo)
    return files


def _images(files: dict[str, str]) -> dict[str, set[str]]:
    return {rel: {m[2] for m in IMAGE_LINE.finditer(text)} for rel, text in files.items() if IMAGE_LINE.search(text)}


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory):
    """A copy of the project as a git repo: commit A, then B = A + a src-only edit; both rendered."""
    repo = tmp_path_factory.mktemp("repo")
    for rel in PROJECT:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, repo / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, repo / rel)
    _git(repo, "init", "-q")
    files_a = _render(repo)
    rev_a = _commit(repo, "A")
    with (repo / "src/e2e_llm/serve.py").open("a") as f:
        f.write("\n# a code-only change\n")
    files_b = _render(repo)
    rev_b = _commit(repo, "B: src only")
    return repo, (rev_a, files_a), (rev_b, files_b)


def test_a_src_only_change_changes_the_image_of_every_rendered_spec_and_nothing_else(two_commits):
    repo, (rev_a, files_a), (rev_b, files_b) = two_commits
    changed = _git(repo, "diff", "--name-only", rev_a, rev_b).splitlines()
    assert "src/e2e_llm/serve.py" in changed
    assert not [p for p in changed if p.startswith(("configs/", "images/"))]  # nothing but code (+ its render)
    images_a, images_b = _images(files_a), _images(files_b)
    assert set(images_a) == set(images_b) >= {"services/llm.yaml", "jobs/train.yaml", "jobs/batch.yaml",
                                             "k8s/base/rayservice-llm.yaml", "k8s/base/rayjob-train.yaml"}
    for rel in images_a:
        assert images_a[rel].isdisjoint(images_b[rel]), f"{rel}: same image after a code change"
    # Only the image identity changed in the specs: blank the image lines and they are equal.
    for rel in files_a:
        assert IMAGE_LINE.sub("image", files_a[rel]) == IMAGE_LINE.sub("image", files_b[rel]), rel
    # The Ray version part of the tag (KubeRay rayVersion) is unchanged.
    rs = yaml.safe_load(files_b["k8s/base/rayservice-llm.yaml"])
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == "2.60.0"
    assert all(":2.60.0-py311-cu128-" in ref for ref in images_b["k8s/base/rayservice-llm.yaml"])


def test_rollback_to_the_previous_revision_reapplies_its_image(two_commits):
    """`make rollback TARGET=k8s REV=<A>` extracts A's manifests (the recipe's own command)."""
    repo, (rev_a, files_a), (rev_b, files_b) = two_commits
    dry = subprocess.run(["make", "-n", "rollback", "TARGET=k8s", "DEPLOY_ENV=prod", f"REV={rev_a}"], cwd=repo,
                         capture_output=True, text=True, check=False)
    assert dry.returncode == 0, dry.stderr
    extract = next(line for line in dry.stdout.splitlines() if "git archive" in line)
    subprocess.run(["bash", "-c", extract], cwd=repo, check=True)
    restored = (repo / ".cache/rollback/k8s/base/rayservice-llm.yaml").read_text()
    assert _images({"rs": restored})["rs"] == _images(files_a)["k8s/base/rayservice-llm.yaml"]
    assert _images({"rs": restored})["rs"] != _images(files_b)["k8s/base/rayservice-llm.yaml"]
    assert "apply --server-side -k .cache/rollback/k8s/overlays/prod" in dry.stdout


def test_identity_is_the_committed_one_on_a_clean_checkout_and_counts_uncommitted_edits(two_commits, tmp_path):
    repo, _, (rev_b, _) = two_commits
    identity = image_identity(repo, "images/serve/Containerfile")
    assert _git(repo, "cat-file", "-t", identity.tree) == "tree"
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert _git(clone, "rev-parse", "HEAD") == rev_b
    assert image_identity(clone, "images/serve/Containerfile") == identity  # fresh checkout: same identity
    (repo / "src/e2e_llm/__pycache__").mkdir(exist_ok=True)
    (repo / "src/e2e_llm/__pycache__/x.pyc").write_bytes(b"ignored")
    assert image_identity(repo, "images/serve/Containerfile") == identity  # ignored files do not count
    lock = repo / "images/serve/requirements.lock"
    original = lock.read_text()
    try:
        lock.write_text(original + "# a pin comment\n")
        changed = image_identity(repo, "images/serve/Containerfile")
        assert changed.id != identity.id and changed.locks != identity.locks
    finally:
        lock.write_text(original)
    assert _git(repo, "status", "--porcelain") == ""  # the real index is never touched
    # train and serve differ (different Containerfile and lock), serve-cpu differs from serve.
    ids = {c: image_identity(repo, c).id for c in
           ("images/train/Containerfile", "images/serve/Containerfile", "images/serve/Containerfile.cpu")}
    assert len(set(ids.values())) == 3


def test_copied_paths_reads_every_copy_source_and_skips_stage_copies():
    text = ("FROM x AS a\nCOPY --chown=1:1 pyproject.toml README.md ./\nCOPY \\\n  src ./src\n"
            "COPY --from=a /opt /opt\n# COPY not/this\nCOPY images/serve/requirements.lock /tmp/r.lock\n")
    assert copied_paths(text) == ["pyproject.toml", "README.md", "src", "images/serve/requirements.lock"]
    assert set(copied_paths((ROOT / "images/serve/Containerfile").read_text())) >= {"src", "configs"}


def test_identity_outside_git_or_with_a_missing_copy_source_fails_clearly(tmp_path):
    (tmp_path / "Containerfile").write_text("FROM x\nCOPY r.lock /tmp/\nCOPY src ./src\n")
    (tmp_path / "r.lock").write_text("a==1\n")
    with pytest.raises(ImageIdentityError, match="COPY sources missing.*src"):
        image_identity(tmp_path, "Containerfile")
    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.py").write_text("")
    with pytest.raises(ImageIdentityError, match="not a git repository"):
        image_identity(tmp_path, "Containerfile")
    with pytest.raises(ImageIdentityError, match="COPY sources missing"):
        tree_of(tmp_path, ["nope"])
