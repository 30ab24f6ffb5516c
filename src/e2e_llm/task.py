# SPDX-License-Identifier: Apache-2.0
"""Task schema and meaning-representation (MR) parser.

A task is "sentence -> one function call with bracketed attribute values", e.g.
``give_opinion(name[Diablo II], rating[good], genres[shooter, puzzle])``. Which
functions and attributes exist, which attributes hold lists and which values are
closed vocabularies comes from a task schema YAML under ``configs/tasks/``; the
parser, evaluation and the structured-decoding grammar all read that schema.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LIST_SEPARATOR = ", "


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionSpec(_Strict):
    description: str = ""
    # Functions such as request_attribute name an attribute without a value: `esrb[]`.
    empty_values: bool = False


class AttributeSpec(_Strict):
    description: str = ""
    # A list-valued attribute: `genres[shooter, puzzle]` is one slot holding a set.
    list: bool = False
    # Closed vocabulary; None means any text without brackets.
    values: builtins.list[str] | None = None

    @field_validator("values")
    @classmethod
    def _values_have_no_brackets(cls, values: builtins.list[str] | None) -> builtins.list[str] | None:
        for value in values or []:
            if any(ch in value for ch in "[]") or not value.strip():
                raise ValueError(f"value {value!r} must be non-empty and contain no brackets")
        return values


class TaskSchema(_Strict):
    """The shape of a task's outputs. Loaded from ``configs/tasks/<name>.yaml``."""

    name: str
    description: str = ""
    functions: dict[str, FunctionSpec] = Field(min_length=1)
    attributes: dict[str, AttributeSpec] = Field(min_length=1)
    # Canonical system prompt; used when a row carries no instruction of its own.
    instruction: str | None = None
    # The references always list attributes in the order of `attributes` below: structured
    # decoding then enforces that order, which also rules out a repeated attribute (a regex
    # cannot forbid repeats in free order). Parsing and scoring stay order-insensitive.
    ordered_attributes: bool = False

    @model_validator(mode="after")
    def _names_are_identifiers(self) -> TaskSchema:
        for kind, names in (("function", self.functions), ("attribute", self.attributes)):
            for name in names:
                if not _NAME.fullmatch(name):
                    raise ValueError(f"{kind} name {name!r} is not an identifier")
        return self

    # -- parsing -------------------------------------------------------------------------

    def parse(self, text: str) -> MeaningRepresentation:
        """Parse and validate ``text``; raises :class:`MRError` naming what is wrong."""
        mr = parse_mr(text, list_attributes={n for n, a in self.attributes.items() if a.list})
        self.validate_mr(mr)
        return mr

    def validate_mr(self, mr: MeaningRepresentation) -> None:
        spec = self.functions.get(mr.function)
        if spec is None:
            raise MRError(f"unknown function {mr.function!r} (allowed: {', '.join(self.functions)})")
        for slot in mr.slots:
            attr = self.attributes.get(slot.name)
            if attr is None:
                raise MRError(f"unknown attribute {slot.name!r} (allowed: {', '.join(self.attributes)})")
            if not slot.values:
                if not spec.empty_values:
                    raise MRError(f"attribute {slot.name!r} has an empty value, not allowed in {mr.function!r}")
                continue
            if attr.values is not None:
                for value in slot.values:
                    if value not in attr.values:
                        raise MRError(f"value {value!r} not allowed for attribute {slot.name!r}")

    def try_parse(self, text: str) -> MeaningRepresentation | None:
        try:
            return self.parse(text)
        except MRError:
            return None

    def default_instruction(self) -> str:
        if self.instruction:
            return self.instruction
        return (
            "Given a target sentence construct the underlying meaning representation of the input "
            "sentence as a single function with attributes and attribute values. The function must be "
            f"one of the following {list(self.functions)}. The attributes must be one of the following: "
            f"{list(self.attributes)}"
        )

    # -- structured decoding -------------------------------------------------------------

    def output_regex(self) -> str:
        """A regex for vLLM structured outputs accepting the well-formed MRs of this schema:
        known functions and attributes, closed vocabularies, empty values only where the
        function allows them, and (with ``ordered_attributes``) attributes in schema order,
        each at most once; otherwise any order, at most as many slots as attributes."""
        alternatives = []
        for empty_ok in (False, True):
            functions = [name for name, spec in self.functions.items() if spec.empty_values == empty_ok]
            if not functions:
                continue
            slots = [self._slot_regex(name, attr, empty_ok) for name, attr in self.attributes.items()]
            if self.ordered_attributes:
                # An ordered subset: a first slot, then any of the later ones, in order.
                body = "(?:" + "|".join(
                    slots[i] + "".join(f"(?:, {later})?" for later in slots[i + 1:]) for i in range(len(slots))
                ) + ")"
            else:
                slot = "(?:" + "|".join(slots) + ")"
                body = f"{slot}(?:, {slot}){{0,{len(slots) - 1}}}"
            names = "(?:" + "|".join(_regex_escape(f) for f in functions) + ")"
            alternatives.append(f"{names}\\({body}\\)")
        return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"

    @staticmethod
    def _slot_regex(name: str, attr: AttributeSpec, empty_ok: bool) -> str:
        if attr.values is not None:
            one = "(?:" + "|".join(_regex_escape(v) for v in attr.values) + ")"
        else:
            # Free text: no brackets, no leading space; inner ", " is allowed. Unbounded: xgrammar
            # expands a bounded repetition into one state per count, and {0,200} made the VIGGO
            # grammar compile in 10 s instead of 1.3 s on a CPU core, before the first row of every
            # batch run; sampling's max_tokens bounds the output anyway.
            one = r"[^\[\]\n ][^\[\]\n]*"
        value = f"{one}(?:, {one})*" if attr.list else one
        if empty_ok:
            value = f"(?:{value})?"
        return f"{_regex_escape(name)}\\[{value}\\]"


def _regex_escape(text: str) -> str:
    """Escape regex metacharacters only (re.escape also escapes spaces, which xgrammar warns about)."""
    return re.sub(r"([\\.^$*+?{}\[\]|()])", r"\\\1", text)


class MRError(ValueError):
    """An output that is not a valid meaning representation."""


@dataclass
class Slot:
    name: str
    values: tuple[str, ...]

    def key(self) -> tuple[str, frozenset[str]]:
        return (self.name, frozenset(self.values))


@dataclass
class MeaningRepresentation:
    function: str
    slots: list[Slot] = field(default_factory=list)

    def slot_keys(self) -> set[tuple[str, frozenset[str]]]:
        return {slot.key() for slot in self.slots}

    def __str__(self) -> str:
        inner = ", ".join(f"{s.name}[{LIST_SEPARATOR.join(s.values)}]" for s in self.slots)
        return f"{self.function}({inner})"


def parse_mr(text: str, list_attributes: set[str] | frozenset[str] = frozenset()) -> MeaningRepresentation:
    """Parse ``fn(attr[v], attr[a, b])`` (syntax only).

    Only attributes in ``list_attributes`` are split on commas: a comma inside a scalar
    value ("Spectrum HoloByte, Inc.", "September 14, 2018") belongs to the value.
    """
    s = text.strip()
    match = _NAME.match(s)
    if not match:
        raise MRError(f"expected a function name at the start of {text!r}")
    function = match.group(0)
    pos = match.end()
    if pos >= len(s) or s[pos] != "(":
        raise MRError(f"expected '(' after function name {function!r}")
    if not s.endswith(")"):
        raise MRError("expected ')' at the end")
    body, pos = s[pos + 1 : -1], 0
    slots: list[Slot] = []
    seen: set[str] = set()
    while pos < len(body):
        m = _NAME.match(body, pos)
        if not m:
            raise MRError(f"expected an attribute name at offset {pos} of {body!r}")
        name = m.group(0)
        pos = m.end()
        if pos >= len(body) or body[pos] != "[":
            raise MRError(f"expected '[' after attribute {name!r}")
        close = body.find("]", pos + 1)
        if close < 0:
            raise MRError(f"unbalanced brackets: attribute {name!r} is never closed")
        raw = body[pos + 1 : close]
        if "[" in raw:
            raise MRError(f"unbalanced brackets in the value of attribute {name!r}")
        if name in seen:
            raise MRError(f"attribute {name!r} appears twice")
        seen.add(name)
        if not raw.strip():
            values: tuple[str, ...] = ()
        elif name in list_attributes:
            values = tuple(v.strip() for v in raw.split(","))
        else:
            values = (raw.strip(),)
        if any(not v for v in values):
            raise MRError(f"empty list item in attribute {name!r}")
        slots.append(Slot(name, values))
        pos = close + 1
        if pos < len(body):
            if not body.startswith(", ", pos):
                raise MRError(f"expected ', ' between attributes at offset {pos} of {body!r}")
            pos += 2
            if pos == len(body):
                raise MRError("trailing ', ' after the last attribute")
    return MeaningRepresentation(function, slots)
