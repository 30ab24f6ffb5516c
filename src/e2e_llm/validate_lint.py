# SPDX-License-Identifier: Apache-2.0
"""Ladder steps 1, 2 and 7 and the Containerfiles: yamllint, ``kubectl kustomize``, no secret
values/placeholders/``latest``/unpinned archives, hadolint and "the image installs its lock"."""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from e2e_llm.env_tools import require_tool
from e2e_llm.pins import lock_pins
from e2e_llm.validate_common import _fmt, _name


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
    result = subprocess.run([require_tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise ValueError(f"{overlay}: kubectl kustomize failed: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


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


# The base image's HOME (rayproject/ray's `ray` user).
IMAGE_HOME = "/home/ray"


def _group_zero_writable(path: Path, parser) -> list[str]:
    """OpenShift runs the image under an arbitrary uid in group 0 (restricted-v2,
    e2e_llm.render_openshift): HOME and the project folder (the last WORKDIR) must be writable by
    group 0, or the first write there (a cache, a merged checkpoint) fails."""
    workdirs = [i["value"].strip() for i in parser.structure if i["instruction"] == "WORKDIR"]
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    problems = []
    for folder in dict.fromkeys([IMAGE_HOME, *workdirs[-1:]]):
        owned = any(re.search(rf"chgrp (-R )?0 ([^&;]* )?{re.escape(folder)}(\s|$)", run) for run in runs)
        writable = any(re.search(rf"chmod (-R )?g=u ([^&;]* )?{re.escape(folder)}(\s|$)", run) for run in runs)
        if not (owned and writable):
            problems.append(f"{path}: {folder}: not writable by group 0 (`chgrp 0` and `chmod g=u`): OpenShift runs "
                            "the image under an arbitrary uid in group 0")
    return problems


def check_containerfile(path: Path, lock: Path, ray_version: str | None = None,
                        machine: str | None = None) -> list[str]:
    """hadolint clean; a pinned base image (no latest/digest-less bare name) whose Ray version
    matches the lock's ``ray`` pin and whose machine (``-aarch64`` or not) is the rendered tag's,
    which the pods' node selectors follow; installs the lock file with pip and nothing unpinned."""
    from dockerfile_parse import DockerfileParser

    from e2e_llm.deploy import reference_tag, tag_machine

    text = path.read_text(encoding="utf-8")
    problems = []
    result = subprocess.run([require_tool("hadolint"), "--no-color", "-"], input=text, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        problems += [f"{path}: hadolint: {line.removeprefix('-:')}" for line in result.stdout.splitlines() if line]
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    base = parser.baseimage or ""
    tag = reference_tag(base)
    pins = lock_pins(lock)
    if not tag or tag == "latest":
        problems.append(f"{path}: FROM {base}: base image tag must be pinned")
    else:
        base_ray = tag.split("-", 1)[0]
        if pins.get("ray") and base_ray != pins["ray"]:
            problems.append(f"{path}: FROM {base}: Ray {base_ray} in the base tag != ray=={pins['ray']} in {lock.name}")
        if ray_version and base_ray != ray_version:
            problems.append(
                f"{path}: FROM {base}: Ray {base_ray} != rayVersion {ray_version} of the rendered image tag")
        if machine and (built_for := tag_machine(tag)) and built_for != machine:
            problems.append(f"{path}: FROM {base}: a {built_for} base, but configs/deploy.yaml's tag is for {machine} "
                            "(the pods select nodes of that machine)")
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
    problems += _group_zero_writable(path, parser)
    users = [i["value"].strip() for i in parser.structure if i["instruction"] == "USER"]
    user = users[-1].partition(":")[0] if users else ""
    if not user.isdigit() or int(user) == 0:
        # runAsNonRoot (the rendered pods' securityContext) can only be checked against a numeric user.
        problems.append(f"{path}: USER {user or '(none)'}: the image must end with a numeric non-root USER "
                        "(the pods run with runAsNonRoot)")
    return problems

