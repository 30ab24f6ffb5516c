# SPDX-License-Identifier: Apache-2.0
"""Build (and optionally push) a project image with whichever container engine answers:
docker, then podman, each asked with `<engine> info` (a client on PATH without a running
daemon does not count). The reference is content-addressed (`DeployConfig.image_ref`: the base
tag of configs/deploy.yaml + the id of what the Containerfile copies and its lock; serve-cpu
gets the serve base tag with the platform part replaced by `cpu`): the one the rendered
manifests name. With --push, a tag that is already in the registry is never built or pushed
again (same tag = same content); after a push the registry digest is printed and, with
--digest-file, recorded as JSON {image, ref, digest}.
Exits 3 with a clear message when no engine answers.

Usage: e2e-llm image --name train|serve|serve-cpu [--push] [--digest-file F] [--dry-run] [--print-ref]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

ENGINES = ("docker", "podman")
EXIT_NO_ENGINE = 3
IMAGES = ("train", "serve", "serve-cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", choices=sorted(IMAGES), required=True)
    parser.add_argument("--push", action="store_true", help="push after building (skipped if the tag exists)")
    parser.add_argument("--digest-file", help="with --push: write {image, ref, digest} JSON here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--print-ref", action="store_true", help="print the content-addressed reference and exit")


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


def image_ref(name: str) -> tuple[str, str]:
    """The content-addressed reference of ``name`` and the platform to build it for: the machine
    its tag names, which the rendered pods select, whatever machine builds it (an Apple silicon
    Mac, an arm64 CI runner)."""
    from e2e_llm.deploy import load_deploy

    deploy = load_deploy()
    return deploy.image_ref(name), f"linux/{deploy.image(name).kubernetes_arch}"


def _out(engine: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([engine, *args], capture_output=True, text=True, check=False, timeout=300)


def run(args: argparse.Namespace) -> int:
    from e2e_llm.config import project_root
    from e2e_llm.images import CONTAINERFILES

    containerfile = CONTAINERFILES[args.name]
    ref, platform = image_ref(args.name)
    if args.print_ref:
        print(ref)
        return 0
    engine, notes = (ENGINES[0], []) if args.dry_run else find_engine()
    if engine is None:
        print(f"no container engine answers, cannot build {ref}:", file=sys.stderr)
        for note in notes:
            print(f"  {note}", file=sys.stderr)
        print("start a docker daemon or install podman, or let CI build it (.github/workflows/deploy.yaml)",
              file=sys.stderr)
        return EXIT_NO_ENGINE
    if args.push and not args.dry_run and _out(engine, "manifest", "inspect", ref).returncode == 0:
        print(f"{ref} is already in the registry: content-addressed tags are never overwritten, nothing to build")
        return _record_digest(engine, ref, args)
    commands = [[engine, "build", "--platform", platform, "-f", containerfile, "-t", ref, "."]]
    if args.push:
        commands.append([engine, "push", ref])
    for command in commands:
        print("+ " + " ".join(command), flush=True)
        if not args.dry_run and (code := subprocess.run(command, cwd=project_root(), check=False).returncode):
            return code
    return _record_digest(engine, ref, args) if args.push and not args.dry_run else 0


def _record_digest(engine: str, ref: str, args: argparse.Namespace) -> int:
    """Print (and write to --digest-file) the registry digest the pushed tag resolves to."""
    result = _out(engine, "manifest", "inspect", "--verbose", ref)
    digest = None
    if result.returncode == 0:
        try:
            data = json.loads(result.stdout)
            data = data[0] if isinstance(data, list) else data
            digest = (data.get("Descriptor") or {}).get("digest") or data.get("digest")
        except (ValueError, AttributeError):
            digest = None
    if not digest:
        print(f"error: no registry digest for {ref} ({result.stderr.strip() or 'manifest inspect gave none'})",
              file=sys.stderr)
        return 1
    repository = ref.rsplit(":", 1)[0]
    print(f"{ref} = {repository}@{digest}")
    if args.digest_file:
        with open(args.digest_file, "w", encoding="utf-8") as f:
            json.dump({"image": args.name, "ref": ref, "digest": f"{repository}@{digest}"}, f)
            f.write("\n")
    return 0
