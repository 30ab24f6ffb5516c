# SPDX-License-Identifier: Apache-2.0
"""Build (and optionally push) a project image with whichever container engine answers:
docker, then podman, each asked with `<engine> info` (a client on PATH without a running
daemon does not count). The tag comes from configs/deploy.yaml (images.train / images.serve;
serve-cpu gets the serve tag with the platform part replaced by `cpu`).
Exits 3 with a clear message when no engine answers.

Usage: e2e-llm image --name train|serve|serve-cpu [--push] [--dry-run]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

ENGINES = ("docker", "podman")
EXIT_NO_ENGINE = 3
# image name -> (Containerfile, deploy.yaml image entry)
IMAGES = {
    "train": ("images/train/Containerfile", "train"),
    "serve": ("images/serve/Containerfile", "serve"),
    "serve-cpu": ("images/serve/Containerfile.cpu", "serve"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", choices=sorted(IMAGES), required=True)
    parser.add_argument("--push", action="store_true", help="push after building")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def find_engine() -> tuple[str | None, list[str]]:
    """The first engine whose `info` succeeds, and why each other one did not."""
    notes = []
    for engine in ENGINES:
        exe = shutil.which(engine)
        if not exe:
            notes.append(f"{engine}: not installed")
            continue
        try:
            result = subprocess.run([exe, "info"], capture_output=True, text=True, check=False, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"{engine}: `{engine} info` failed ({exc})")
            continue
        if result.returncode == 0:
            return exe, notes
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        notes.append(f"{engine}: `{engine} info` exited {result.returncode} ({last[0]})")
    return None, notes


def image_ref(name: str) -> str:
    from e2e_llm.deploy import IMAGE_TAG, load_deploy

    deploy = load_deploy()
    image = getattr(deploy.images, IMAGES[name][1])
    if name == "serve-cpu":
        m = IMAGE_TAG.match(image.tag)
        tag = f"{m['ray']}-py{m['py']}-cpu" + (f"-{m['release']}" if m["release"] else "")
        return f"{image.repository}:{tag}"
    return image.ref


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import project_root

    containerfile, _ = IMAGES[args.name]
    ref = image_ref(args.name)
    engine, notes = (ENGINES[0], []) if args.dry_run else find_engine()
    if engine is None:
        print(f"no container engine answers, cannot build {ref}:", file=sys.stderr)
        for note in notes:
            print(f"  {note}", file=sys.stderr)
        print("start a docker daemon or install podman, or let CI build it (.github/workflows/deploy.yaml)",
              file=sys.stderr)
        return EXIT_NO_ENGINE
    commands = [[engine, "build", "-f", containerfile, "-t", ref, "."]]
    if args.push:
        commands.append([engine, "push", ref])
    for command in commands:
        print("+ " + " ".join(command), flush=True)
        if not args.dry_run and (code := subprocess.run(command, cwd=project_root(), check=False).returncode):
            return code
    return 0
