# SPDX-License-Identifier: Apache-2.0
"""The only modules that touch a library's private API: one per library.

Each private name used is an :class:`Entry` (why it is needed, the upstream issue or PR, the
parameters we rely on) resolved through :func:`resolve`, so an upgrade that removes, moves or
re-signs it fails at import with a :class:`CompatError` naming the entry, and the tests in
``tests/unit/test_compat_*.py`` check every entry. Everything else in ``src/`` uses public names.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any


class CompatError(ImportError):
    """A private name this project relies on is missing or has another signature."""


@dataclass(frozen=True)
class Entry:
    module: str  # where the name lives
    name: str  # attribute path inside the module, e.g. "LLMServer._batch_output_stream"
    why: str  # why we need the private name (what breaks without it)
    upstream: str | None = None  # upstream issue/PR that would make the entry unnecessary
    params: tuple[str, ...] | None = None  # parameter names we call or override with, in order

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def resolve(entry: Entry, owner: str) -> Any:
    """The object ``entry`` names, after checking its parameters; a :class:`CompatError`
    naming the entry, its purpose and the compat module ``owner`` otherwise."""
    hint = f"update the entry in {owner} (needed because: {entry.why})"
    try:
        obj: Any = importlib.import_module(entry.module)
    except ImportError as exc:
        raise CompatError(f"{entry.qualname}: module {entry.module} cannot be imported ({exc}); {hint}") from None
    for part in entry.name.split("."):
        if not hasattr(obj, part):
            raise CompatError(f"{entry.qualname}: {part!r} no longer exists; {hint}")
        obj = getattr(obj, part)
    if entry.params is not None:
        try:
            found = tuple(inspect.signature(obj).parameters)
        except (TypeError, ValueError) as exc:
            raise CompatError(f"{entry.qualname}: not callable any more ({exc}); {hint}") from None
        if found != entry.params:
            raise CompatError(f"{entry.qualname}: signature changed, expected ({', '.join(entry.params)}), "
                              f"found ({', '.join(found)}); {hint}")
    return obj


def problems(entries: list[Entry], owner: str) -> list[str]:
    """Every entry that does not resolve, as messages (empty when all are fine)."""
    out = []
    for entry in entries:
        try:
            resolve(entry, owner)
        except CompatError as exc:
            out.append(str(exc))
    return out
