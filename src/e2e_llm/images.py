# SPDX-License-Identifier: Apache-2.0
"""Content-addressed image identities: an image's tag is derived from what goes into it, so a
change of code or pins changes every rendered spec that names the image, and a tag once pushed
is never pushed again with other content.

The identity of an image is computed once, here, from:
- the git tree of exactly the paths its Containerfile ``COPY``s (plus the Containerfile itself),
  hashed the way git hashes them (ignored files such as ``__pycache__`` excluded), from the
  working tree, so an uncommitted edit already counts and a clean checkout at a commit gives
  that commit's identity; and
- the sha256 of its lock file(s) (``images/<name>/requirements*.lock`` that it copies).

Tag = ``<base tag>-<12 hex digits of sha256(tree, locks)>``, e.g. ``2.60.0-py311-cu128-3f2a9c1b7d4e``
(the base tag ``<ray>-py<NNN>-<platform>`` comes from ``configs/deploy.yaml``; KubeRay's
``rayVersion`` is still read from it).

Usage:
    identity = image_identity(root, "images/serve/Containerfile")
    identity.tag("2.60.0-py311-cu128")      # -> "2.60.0-py311-cu128-<id>"
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from e2e_llm.config import ConfigError

ID_LENGTH = 12
# image name -> Containerfile (relative to the project root); serve-cpu shares serve's lock.
CONTAINERFILES = {
    "train": "images/train/Containerfile",
    "serve": "images/serve/Containerfile",
    "serve-cpu": "images/serve/Containerfile.cpu",
}


class ImageIdentityError(ConfigError):
    """The identity cannot be computed (not a git checkout, a COPY source missing, ...)."""


@dataclass(frozen=True)
class ImageIdentity:
    containerfile: str
    paths: tuple[str, ...]  # what the Containerfile copies (and the Containerfile)
    tree: str               # git tree sha of exactly those paths
    locks: tuple[tuple[str, str], ...]  # (lock path, sha256)

    @property
    def id(self) -> str:
        text = f"tree {self.tree}\n" + "".join(f"lock {p} {d}\n" for p, d in self.locks)
        return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]

    def tag(self, base_tag: str) -> str:
        return f"{base_tag}-{self.id}"


def copied_paths(containerfile_text: str) -> list[str]:
    """The build-context sources of every ``COPY`` (``--from=`` stage copies excluded; flags and
    the destination dropped; line continuations joined)."""
    text = containerfile_text.replace("\\\n", " ")
    sources: list[str] = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True) if line.strip() else []
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = words[1:]
        if any(a.startswith("--from") for a in args):
            continue
        args = [a for a in args if not a.startswith("--")]
        if len(args) < 2:
            raise ImageIdentityError(f"COPY without source and destination: {line.strip()!r}")
        sources += [a.removeprefix("./").rstrip("/") or "." for a in args[:-1]]
    return sources


def _git(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False,
                                env={**os.environ, **(env or {})})
    except FileNotFoundError as exc:
        raise ImageIdentityError("git not found: image identities are git tree hashes") from exc
    if result.returncode != 0:
        raise ImageIdentityError(f"git {' '.join(args)} failed in {root}: {result.stderr.strip()}")
    return result.stdout.strip()


def tree_of(root: Path, paths: list[str]) -> str:
    """The git tree sha of ``paths`` as they are in the working tree (tracked and untracked
    files, ignored ones excluded), through a throwaway index: the real index is not touched."""
    missing = [p for p in paths if not (root / p).exists()]
    if missing:
        raise ImageIdentityError(f"COPY sources missing under {root}: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        _git(root, "add", "--", *paths, env=env)
        return _git(root, "write-tree", env=env)


def image_identity(root: Path, containerfile: str) -> ImageIdentity:
    """The content identity of the image built from ``containerfile`` (relative to ``root``)."""
    root = Path(root).resolve()
    path = root / containerfile
    if not path.is_file():
        raise ImageIdentityError(f"{path}: no such Containerfile")
    paths = sorted({containerfile, *copied_paths(path.read_text(encoding="utf-8"))})
    locks = tuple((p, hashlib.sha256((root / p).read_bytes()).hexdigest())
                  for p in paths if p.endswith(".lock") and (root / p).is_file())
    if not locks:
        raise ImageIdentityError(f"{containerfile}: copies no lock file; the identity needs its pins")
    return ImageIdentity(containerfile, tuple(paths), tree_of(root, paths), locks)
