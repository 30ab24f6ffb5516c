# SPDX-License-Identifier: Apache-2.0
"""Training rows longer than the recipe's cutoff_len are found before any worker starts
(e2e_llm.train_lengths), counted as LLaMA-Factory's own preprocessing makes them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from e2e_llm.config import load_profile

pytestmark = pytest.mark.train
pytest.importorskip("llamafactory")

LONG_LINE = 3  # the long row's line in the source's train.jsonl (and the ingested file's)


@pytest.fixture()
def source(tmp_path, viggo_dir):
    """A copy of a few VIGGO rows where the train split's row on line 3 has an input 20 times as long."""
    rows = [json.loads(line) for line in (viggo_dir / "train.jsonl").read_text().splitlines()[:8]]
    rows[LONG_LINE - 1]["input"] = " ".join([rows[LONG_LINE - 1]["input"]] * 20)
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "val.jsonl").write_text((viggo_dir / "val.jsonl").read_text().split("\n", 4)[0] + "\n")
    return folder


@pytest.fixture()
def profile(tmp_path, project_root, monkeypatch, local_model, source):
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path / "store"))

    def make(**changes):
        from e2e_llm.data import ingest

        data = yaml.safe_load((project_root / "configs/profiles/local.yaml").read_text())
        data["data"]["source"] = str(source)
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            data[section][key] = value
        path = tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(data))
        config = load_profile(str(path), root=project_root)
        ingest(source=str(source), splits={"train": "train.jsonl", "val": "val.jsonl"},
               output_dir=Path(config.storage_uri("data", "viggo")), task=config.task_schema(), dataset="viggo",
               system_prompt=config.data.system_prompt)
        return config

    return make


def test_a_row_over_cutoff_len_is_refused_naming_its_line_and_the_cutoff_that_fits(profile):
    from e2e_llm.train import TrainError, plan_run

    config = profile()
    with pytest.raises(TrainError) as refused:
        plan_run(config)
    message = str(refused.value)
    found = re.search(r"1 of the 8 rows this run trains on is longer than the recipe's cutoff_len 512 tokens "
                      r"\(the longest: (\S+) line 3, (\d+) tokens", message)
    assert found, message
    assert found[1].endswith("viggo/train.jsonl") and Path(found[1]).is_file()
    longest = int(found[2])
    assert longest > 512
    suggested = -(-longest // 64) * 64
    assert f"--set cutoff_len={suggested}" in message and "train.rows_over_cutoff: truncate" in message
    # the local engines take 1024 tokens: a row that needs more is said to need them too
    assert suggested > config.model.max_model_len
    assert f"more than the profile's model.max_model_len {config.model.max_model_len}: raise that too" in message
    assert str(config.source_file) in message

    plan = plan_run(config, overrides={"cutoff_len": suggested})  # what the message says, done
    assert plan.row_lengths == {"checked": True, "file": found[1], "cutoff_len": suggested, "rows": 8, "over": 0,
                                "longest": longest, "longest_line": LONG_LINE, "policy": "refuse"}


def test_truncate_trains_on_them_and_says_how_many(profile):
    from e2e_llm.train import plan_run
    from e2e_llm.train_lengths import notice

    plan = plan_run(profile(train__rows_over_cutoff="truncate"))
    assert plan.row_lengths["over"] == 1 and plan.row_lengths["policy"] == "truncate"
    assert re.fullmatch(r"1 of 8 training rows are longer than cutoff_len 512 \(longest \d+ tokens\): trained cut "
                        r"to it \(train\.rows_over_cutoff: truncate\)", notice(plan.row_lengths))


def test_only_the_rows_max_samples_keeps_are_counted(profile):
    from e2e_llm.train import plan_run

    plan = plan_run(profile(), overrides={"max_samples": LONG_LINE - 1})
    assert plan.row_lengths["rows"] == LONG_LINE - 1 and plan.row_lengths["over"] == 0
    assert plan.row_lengths["longest"] <= 512 and plan.row_lengths["longest_line"] <= LONG_LINE - 1


def test_a_tokenizer_this_machine_cannot_load_leaves_the_rows_unchecked(profile, monkeypatch):
    from e2e_llm.compat import llamafactory
    from e2e_llm.train import plan_run
    from e2e_llm.train_lengths import notice

    def offline(args):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(llamafactory, "row_length_counter", offline)
    plan = plan_run(profile())
    assert plan.row_lengths["checked"] is False and "couldn't connect" in plan.row_lengths["why"]
    assert notice(plan.row_lengths).startswith("row lengths against cutoff_len not checked on this machine (OSError")


@pytest.mark.parametrize("template", ["smollm2", "qwen", "gemma2"])  # gemma2: an efficient_eos template
def test_the_counts_are_the_lengths_llamafactorys_preprocessing_makes(local_model, viggo_dir, template):
    """The oracle is LLaMA-Factory's own supervised preprocessing (internal: used here only), on rows
    short enough that it cuts nothing."""
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from e2e_llm.compat.llamafactory import row_length_counter

    args = {"model_name_or_path": str(local_model), "template": template, "cutoff_len": 4096}
    count, cutoff = row_length_counter(args)
    assert cutoff == 4096
    rows = [json.loads(line) for line in (viggo_dir / "train.jsonl").read_text().splitlines()[:6]]
    rows[1]["input"] = "ünïcödé  and\ttabs " * 3
    tokenizer_module = load_tokenizer(ModelArguments(model_name_or_path=str(local_model)))
    data_args = DataArguments(template=template, cutoff_len=4096)
    theirs = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    processor = SupervisedDatasetProcessor(template=theirs, tokenizer=tokenizer_module["tokenizer"],
                                           processor=tokenizer_module["processor"], data_args=data_args)
    n = len(rows)
    made = processor.preprocess_dataset({
        "_prompt": [[{"role": "user", "content": r["input"]}] for r in rows],
        "_response": [[{"role": "assistant", "content": r["output"]}] for r in rows],
        "_system": [r["instruction"] for r in rows], "_tools": [""] * n,
        "_images": [None] * n, "_videos": [None] * n, "_audios": [None] * n})
    assert [count(r["instruction"], r["input"], r["output"]) for r in rows] == [len(i) for i in made["input_ids"]]


def test_the_default_cutoff_len_is_llamafactorys_when_the_recipe_sets_none(local_model):
    from llamafactory.hparams import DataArguments

    from e2e_llm.compat.llamafactory import row_length_counter

    _, cutoff = row_length_counter({"model_name_or_path": str(local_model), "template": "smollm2"})
    assert cutoff == DataArguments().cutoff_len


def test_the_engines_context_is_named_only_where_the_cutoff_that_fits_exceeds_it():
    from e2e_llm.train_lengths import RowLengths, over_cutoff_message

    found = RowLengths("data/train.jsonl", 512, 100, 3, 700, 42)
    fits = over_cutoff_message(found, "recipe.yaml", "profile.yaml", max_model_len=4096)
    assert "3 of the 100 rows this run trains on are longer" in fits and "line 42, 700 tokens" in fits
    assert "--set cutoff_len=704" in fits and "max_model_len" not in fits
    assert "model.max_model_len 640: raise that too" in over_cutoff_message(found, "r", "p", max_model_len=640)
