# SPDX-License-Identifier: Apache-2.0
"""Training rows as LLaMA-Factory will make them, checked before any worker starts.

Two things LLaMA-Factory does without a word, found on the driver with the tokenizer and chat
template training loads (:func:`e2e_llm.compat.llamafactory.row_encoder`), over the rows the run
trains on (the first ``max_samples`` rows of the train split, as LLaMA-Factory takes them):

- **Rows longer than the recipe's ``cutoff_len``**: cut down to it, packed or not (the end of the
  prompt, of the answer or of both), so an adapter learns from rows that no longer say what the data
  says: answers cut mid-way, prompts without their end. A dataset of longer texts than VIGGO's meets
  it with a recipe's default ``cutoff_len``. By the profile's ``train.rows_over_cutoff``: refused
  (default) or trained cut.
- **A prompt format other than the engines'**: training formats each row with the recipe's
  LLaMA-Factory ``template``; the batch and serving engines (vLLM) format requests with the base
  model's own chat template. Where the two differ (a template that does not fit the model, or a
  model whose template adds text of its own, as Llama 3.1's date lines) the adapter is asked in
  another format than it learned. By ``train.prompt_format_mismatch``: refused (default) or trained.

A machine that cannot load the tokenizer (a hub model on a head node without the hub) leaves the
rows unchecked, said so, rather than stopping the run. The run's manifest records what was found.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from e2e_llm import storage
from e2e_llm.data import ALPACA_COLUMNS, chat_messages, parse_jsonl
from e2e_llm.model_mirror import ModelMirrorError, loadable

# Rows whose prompts are compared with the engines' format: the format is the template's, so a few
# rows show it (more would only cost time); rows differ only where a template trims or escapes.
PROMPT_ROWS = 16
SNIPPET = 60  # characters of each side shown around the first difference


@dataclasses.dataclass(frozen=True)
class RowLengths:
    file: str  # the split file the rows were read from
    cutoff_len: int  # the recipe's
    limit: int  # the most tokens of a row training keeps (cutoff_len, one fewer with packing)
    rows: int  # rows the run trains on
    over: int  # of them, longer than the limit
    longest: int  # tokens of the longest row
    longest_line: int  # its line in ``file``

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    file: str
    template: str | None  # the recipe's LLaMA-Factory template
    rows: int  # rows compared
    mismatch_line: int | None  # the first row whose prompts differ, None: all the same
    at: int | None = None  # the first character that differs
    training: str | None = None  # that row's prompt from there, as training makes it
    serving: str | None = None  # and as the engines do

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rows_trained(text: str, max_samples: int | None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of the rows LLaMA-Factory trains on: its first ``max_samples``."""
    rows = parse_jsonl(text)
    return rows[:max_samples] if max_samples else rows


def _parts(row: dict[str, Any]) -> tuple[str, str, str]:
    """(system, user, assistant) of a row as LLaMA-Factory reads it (e2e_llm.data.ALPACA_COLUMNS)."""
    return tuple(row.get(ALPACA_COLUMNS[part]) or "" for part in ("system", "prompt", "response"))


def measure_lengths(encoder, rows: list[tuple[int, dict[str, Any]]], file: str) -> RowLengths:
    lengths = [(encoder.length(*_parts(row)), number) for number, row in rows]
    longest, line = max(lengths, default=(0, 0))
    return RowLengths(file, encoder.cutoff_len, encoder.limit, len(rows),
                      sum(n > encoder.limit for n, _ in lengths), longest, line)


def limit_phrase(cutoff_len: int, limit: int) -> str:
    """The limit as the recipe's cutoff_len, with the tokens LLaMA-Factory keeps back (packing)."""
    kept = f", of which LLaMA-Factory keeps {limit} tokens of a row under this recipe (packing holds one back)"
    return f"cutoff_len {cutoff_len}" + (kept if limit != cutoff_len else " tokens")


def serving_prompt(tokenizer, row: dict[str, Any]) -> str:
    """A row's prompt as the batch and serving engines make it: its chat messages
    (:func:`e2e_llm.data.chat_messages`) in the base model's own chat template with the generation
    prompt (vLLM renders it so, and tokenizes the text as it is)."""
    return tokenizer.apply_chat_template(chat_messages(row), add_generation_prompt=True, tokenize=False)


def compare_prompts(encoder, serving_tokenizer, rows: list[tuple[int, dict[str, Any]]], file: str,
                    template: str | None) -> PromptFormat:
    compared = rows[:PROMPT_ROWS]
    for number, row in compared:
        system, user, _ = _parts(row)
        training, serving = encoder.prompt_text(system, user), serving_prompt(serving_tokenizer, row)
        if training != serving:
            at = next((i for i, (a, b) in enumerate(zip(training, serving)) if a != b),
                      min(len(training), len(serving)))
            return PromptFormat(file, template, len(compared), number, at, training[at:at + SNIPPET],
                                serving[at:at + SNIPPET])
    return PromptFormat(file, template, len(compared), None)


def suggested_cutoff(longest: int) -> int:
    """The next multiple of 64 at or above ``longest``: room for every row, in GPU-friendly blocks."""
    return -(-longest // 64) * 64


def over_cutoff_message(found: RowLengths, recipe_path: str, profile_file: str, max_model_len: int) -> str:
    fits = suggested_cutoff(found.longest + found.cutoff_len - found.limit)
    engines = (f" (more than the profile's model.max_model_len {max_model_len}: raise that too, or the batch and "
               "serving engines refuse prompts that long)" if fits > max_model_len else "")
    return (f"{found.over} of the {found.rows} rows this run trains on {'is' if found.over == 1 else 'are'} longer "
            f"than the recipe's {limit_phrase(found.cutoff_len, found.limit)} (the longest: {found.file} line "
            f"{found.longest_line}, {found.longest} tokens in the recipe's chat template). LLaMA-Factory would cut "
            "each to cutoff_len without a word (the end of its prompt, of its answer or both) and the adapter would "
            f"learn from the cut rows. Raise cutoff_len to {fits} (`--set cutoff_len={fits}`, or in {recipe_path})"
            f"{engines}, leave the long rows out of the source, or set train.rows_over_cutoff: truncate in "
            f"{profile_file} to train on them cut")


def prompt_format_message(found: PromptFormat, model: str, recipe_path: str, profile_file: str) -> str:
    return (f"the recipe's LLaMA-Factory template {found.template!r} formats the prompt of {found.file} line "
            f"{found.mismatch_line} otherwise than {model}'s own chat template, which the batch and serving "
            f"engines (vLLM) ask with: from character {found.at} training has {found.training!r} and the engines "
            f"{found.serving!r}. The adapter would be asked in another format than it learned. Set the template "
            f"that fits the model (`template:` in {recipe_path}, or `--set template=...`), or set "
            f"train.prompt_format_mismatch: allow in {profile_file} to train anyway")


def check(config, args: dict[str, Any], split_uri: str, recipe_path: str) -> tuple[dict[str, Any], str | None]:
    """(what the manifest records, why the run is refused or None) for the rows of the train split
    ``split_uri`` under the profile's ``train.rows_over_cutoff`` and ``train.prompt_format_mismatch``."""
    from transformers import AutoTokenizer

    from e2e_llm.compat.llamafactory import row_encoder

    tc = config.train
    try:
        # a model kept in object storage: a copy of its tokenizer here
        model = loadable(args["model_name_or_path"], config.object_store_kw(), weights=False)
        encoder = row_encoder({**args, "model_name_or_path": model})
        serving_tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ModelMirrorError) as exc:  # no hub or store here, or no model there
        return {"checked": False, "why": f"{type(exc).__name__}: {exc}"[:300]}, None
    except ValueError as exc:  # LLaMA-Factory's, of the recipe (an unknown template): the workers would fail alike
        return {"checked": False, "why": str(exc)}, f"{recipe_path}: {exc}"
    rows = rows_trained(storage.read_text(split_uri, **config.storage_kw()), args.get("max_samples"))
    lengths = measure_lengths(encoder, rows, split_uri)
    record: dict[str, Any] = {"checked": True, "lengths": {**lengths.as_dict(), "policy": tc.rows_over_cutoff}}
    if lengths.over and tc.rows_over_cutoff == "refuse":
        return record, over_cutoff_message(lengths, recipe_path, config.source_file, config.model.max_model_len)
    try:
        prompts = compare_prompts(encoder, serving_tokenizer, rows, split_uri, args.get("template"))
    except ValueError as exc:  # transformers: the tokenizer has no chat template (a base model)
        record["prompt_format"] = {"checked": False, "why": f"{type(exc).__name__}: {exc}"[:300]}
        return record, None
    record["prompt_format"] = {**prompts.as_dict(), "policy": tc.prompt_format_mismatch}
    if prompts.mismatch_line is not None and tc.prompt_format_mismatch == "refuse":
        return record, prompt_format_message(prompts, config.model.id, recipe_path, config.source_file)
    return record, None


def notices(record: dict[str, Any]) -> list[str]:
    """The lines a run prints about its rows, where there is something to say."""
    if not record:
        return []
    if not record["checked"]:
        return [f"rows not checked against cutoff_len and the engines' prompt format on this machine "
                f"({record['why']})"]
    lines = []
    lengths, prompts = record["lengths"], record.get("prompt_format") or {}
    if lengths["over"]:
        phrase = limit_phrase(lengths["cutoff_len"], lengths["limit"])
        lines.append(f"{lengths['over']} of {lengths['rows']} training rows are longer than {phrase} (longest "
                     f"{lengths['longest']} tokens): trained cut to it "
                     "(train.rows_over_cutoff: truncate)")
    if prompts.get("checked") is False:
        lines.append(f"prompt format not compared with the engines' ({prompts['why']})")
    elif prompts.get("mismatch_line") is not None:
        lines.append(f"the recipe's template {prompts['template']!r} formats prompts otherwise than the model's own "
                     f"chat template from character {prompts['at']} (line {prompts['mismatch_line']}): trained "
                     "anyway (train.prompt_format_mismatch: allow)")
    return lines
