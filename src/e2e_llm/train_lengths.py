# SPDX-License-Identifier: Apache-2.0
"""Training rows longer than the recipe's ``cutoff_len``, found before any worker starts.

LLaMA-Factory cuts a row longer than ``cutoff_len`` tokens down to it without a word, packed or
not (the end of its prompt, of its answer or of both), so an adapter would learn from rows that no
longer say what the data says: answers cut mid-way, prompts without their end. A dataset of
longer texts than VIGGO's meets it with a recipe's default ``cutoff_len``. The driver counts the
tokens of every row the run trains on (the first ``max_samples`` rows of the train split, as
LLaMA-Factory takes them) with the tokenizer and chat template training loads
(:func:`e2e_llm.compat.llamafactory.row_length_counter`) and, by the profile's
``train.rows_over_cutoff``, refuses the run (``refuse``, the default) or trains on them cut
(``truncate``); the run's manifest records what was found.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from e2e_llm import storage
from e2e_llm.data import ALPACA_COLUMNS


@dataclasses.dataclass(frozen=True)
class RowLengths:
    file: str  # the split file the rows were read from
    cutoff_len: int
    rows: int  # rows the run trains on
    over: int  # of them, longer than cutoff_len
    longest: int  # tokens of the longest row
    longest_line: int  # its line in ``file``

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rows_trained(text: str, max_samples: int | None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of the rows LLaMA-Factory trains on: its first ``max_samples``."""
    rows = [(number, json.loads(line)) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return rows[:max_samples] if max_samples else rows


def measure(args: dict[str, Any], split_uri: str, fs_kw: dict[str, Any]) -> RowLengths:
    """Count the tokens of each row of ``split_uri`` that a run with the resolved recipe ``args``
    trains on."""
    from e2e_llm.compat.llamafactory import row_length_counter

    count, cutoff = row_length_counter(args)
    rows = rows_trained(storage.read_text(split_uri, **fs_kw), args.get("max_samples"))
    lengths = [(count(*(row.get(ALPACA_COLUMNS[part]) or "" for part in ("system", "prompt", "response"))), number)
               for number, row in rows]
    longest, line = max(lengths, default=(0, 0))
    return RowLengths(split_uri, cutoff, len(rows), sum(n > cutoff for n, _ in lengths), longest, line)


def suggested_cutoff(longest: int) -> int:
    """The next multiple of 64 at or above ``longest``: room for every row, in GPU-friendly blocks."""
    return -(-longest // 64) * 64


def over_cutoff_message(found: RowLengths, recipe_path: str, profile_file: str, max_model_len: int) -> str:
    fits = suggested_cutoff(found.longest)
    engines = (f" (more than the profile's model.max_model_len {max_model_len}: raise that too, or the batch and "
               "serving engines refuse prompts that long)" if fits > max_model_len else "")
    return (f"{found.over} of the {found.rows} rows this run trains on {'is' if found.over == 1 else 'are'} longer "
            f"than the recipe's cutoff_len {found.cutoff_len} tokens (the longest: {found.file} line "
            f"{found.longest_line}, {found.longest} tokens in the recipe's chat template). LLaMA-Factory would cut "
            "each to cutoff_len without a word (the end of its prompt, of its answer or both) and the adapter would "
            f"learn from the cut rows. Raise cutoff_len to {fits} (`--set cutoff_len={fits}`, or in {recipe_path})"
            f"{engines}, leave the long rows out of the source, or set train.rows_over_cutoff: truncate in "
            f"{profile_file} to train on them cut")


def check(config, args: dict[str, Any], split_uri: str, recipe_path: str) -> tuple[dict[str, Any], str | None]:
    """(what the manifest records, why the run is refused or None) for the rows of the train split
    ``split_uri`` under the profile's ``train.rows_over_cutoff``. A tokenizer this machine cannot
    load (a hub model on a head node without the hub) leaves the rows unchecked, said so, rather
    than stopping the run."""
    policy = config.train.rows_over_cutoff
    try:
        found = measure(args, split_uri, config.storage_kw())
    except (OSError, ValueError) as exc:
        return {"checked": False, "why": f"{type(exc).__name__}: {exc}"[:300], "policy": policy}, None
    refusal = (over_cutoff_message(found, recipe_path, config.source_file, config.model.max_model_len)
               if found.over and policy == "refuse" else None)
    return {"checked": True, **found.as_dict(), "policy": policy}, refusal


def notice(record: dict[str, Any]) -> str | None:
    """The line a run prints about its rows' lengths, where there is something to say."""
    if not record:
        return None
    if not record["checked"]:
        return f"row lengths against cutoff_len not checked on this machine ({record['why']})"
    if record["over"]:
        return (f"{record['over']} of {record['rows']} training rows are longer than cutoff_len {record['cutoff_len']} "
                f"(longest {record['longest']} tokens): trained cut to it (train.rows_over_cutoff: truncate)")
    return None
