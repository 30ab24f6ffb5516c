# SPDX-License-Identifier: Apache-2.0
"""Training rows are checked before any worker starts (e2e_llm.train_rows): rows longer than the
recipe's cutoff_len, counted as LLaMA-Factory's own preprocessing makes them, and prompts formatted
otherwise than the model's own chat template the engines ask with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

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
def profile(local_profile, local_model, source):
    """The local profile (changed as asked) on ``source``'s rows, ingested as `e2e-llm data` does."""

    def make(**changes):
        from e2e_llm.data import ingest

        config = local_profile(data__source=str(source), **changes)
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
    assert plan.training_rows["lengths"] == {"file": found[1], "cutoff_len": suggested, "limit": suggested,
                                             "rows": 8, "over": 0, "longest": longest, "longest_line": LONG_LINE,
                                             "policy": "refuse"}
    assert plan.training_rows["prompt_format"]["mismatch_line"] is None
    assert plan.training_rows["prompt_format"]["rows"] == 8 and plan.training_rows["prompt_format"]["template"] == \
        "smollm2"


def test_with_packing_the_row_that_fits_is_one_token_shorter_than_cutoff_len(profile):
    """LLaMA-Factory keeps a row's cutoff_len - 1 tokens with packing (the cluster recipes pack): a
    row of cutoff_len tokens is cut, and the cutoff_len suggested leaves room for that token."""
    from e2e_llm.train import TrainError, plan_run

    config = profile()
    longest = plan_run(config, overrides={"cutoff_len": 2048}).training_rows["lengths"]["longest"]
    with pytest.raises(TrainError) as refused:
        plan_run(config, overrides={"cutoff_len": longest, "packing": True})
    message = str(refused.value)
    assert (f"is longer than the recipe's cutoff_len {longest}, of which LLaMA-Factory keeps {longest - 1} tokens "
            "of a row under this recipe (packing holds one back)") in message
    suggested = -(-(longest + 1) // 64) * 64
    assert f"--set cutoff_len={suggested}" in message
    lengths = plan_run(config, overrides={"cutoff_len": longest + 1, "packing": True}).training_rows["lengths"]
    assert (lengths["cutoff_len"], lengths["limit"], lengths["over"]) == (longest + 1, longest, 0)


def test_the_packed_limit_is_what_llamafactorys_packing_keeps_of_a_row(local_model, viggo_dir):
    """Oracle: LLaMA-Factory's own packed preprocessing (internal: used here only) keeps a row of
    n tokens whole with cutoff_len n + 1, and cuts it with cutoff_len n, as the limit says."""
    from llamafactory.data.processor.supervised import PackedSupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from e2e_llm.compat.llamafactory import row_encoder

    row = json.loads((viggo_dir / "train.jsonl").read_text().splitlines()[0])
    parts = (row["instruction"], row["input"], row["output"])
    n = row_encoder({"model_name_or_path": str(local_model), "template": "smollm2", "cutoff_len": 4096}).length(*parts)
    tokenizer_module = load_tokenizer(ModelArguments(model_name_or_path=str(local_model)))
    for cutoff_len in (n, n + 1):
        recipe = {"template": "smollm2", "cutoff_len": cutoff_len, "packing": True, "neat_packing": True}
        encoder = row_encoder({"model_name_or_path": str(local_model), **recipe})
        data_args = DataArguments(**recipe)
        processor = PackedSupervisedDatasetProcessor(
            template=get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args),
            tokenizer=tokenizer_module["tokenizer"], processor=tokenizer_module["processor"], data_args=data_args)
        made = processor.preprocess_dataset({
            "_prompt": [[{"role": "user", "content": row["input"]}]],
            "_response": [[{"role": "assistant", "content": row["output"]}]],
            "_system": [row["instruction"]], "_tools": [""], "_images": [None], "_videos": [None], "_audios": [None]})
        kept = sum(made["attention_mask"][0][i] != 0 for i in range(len(made["attention_mask"][0])))
        assert (encoder.cutoff_len, encoder.limit) == (cutoff_len, cutoff_len - 1)
        assert kept == min(n, encoder.limit)


def test_truncate_trains_on_them_and_says_how_many(profile):
    from e2e_llm.train import plan_run
    from e2e_llm.train_rows import notices

    plan = plan_run(profile(train__rows_over_cutoff="truncate"))
    lengths = plan.training_rows["lengths"]
    assert lengths["over"] == 1 and lengths["policy"] == "truncate"
    [line] = notices(plan.training_rows)
    assert re.fullmatch(r"1 of 8 training rows are longer than cutoff_len 512 tokens \(longest \d+ tokens\): "
                        r"trained cut to it \(train\.rows_over_cutoff: truncate\)", line)


def test_only_the_rows_max_samples_keeps_are_counted(profile):
    from e2e_llm.train import plan_run

    plan = plan_run(profile(), overrides={"max_samples": LONG_LINE - 1})
    lengths = plan.training_rows["lengths"]
    assert lengths["rows"] == LONG_LINE - 1 and lengths["over"] == 0
    assert lengths["longest"] <= 512 and lengths["longest_line"] <= LONG_LINE - 1


def test_a_tokenizer_this_machine_cannot_load_leaves_the_rows_unchecked(profile):
    """A hub model on a head node without the hub (here: none, or a name it does not hold)."""
    from e2e_llm.train import plan_run
    from e2e_llm.train_rows import notices

    plan = plan_run(profile(model__source="hf:e2e-llm-tests/no-such-model"))
    assert plan.training_rows["checked"] is False and plan.training_rows["why"].startswith("OSError: ")
    assert notices(plan.training_rows)[0].startswith("rows not checked against cutoff_len and the engines' prompt "
                                                     "format on this machine (OSError")


@pytest.mark.parametrize("template", ["smollm2", "qwen", "gemma2"])  # gemma2: an efficient_eos template
def test_the_counts_are_the_lengths_llamafactorys_preprocessing_makes(local_model, viggo_dir, template):
    """The oracle is LLaMA-Factory's own supervised preprocessing (internal: used here only), on rows
    short enough that it cuts nothing."""
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer

    from e2e_llm.compat.llamafactory import row_encoder

    encoder = row_encoder({"model_name_or_path": str(local_model), "template": template, "cutoff_len": 4096})
    assert encoder.cutoff_len == 4096
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
    assert [encoder.length(r["instruction"], r["input"], r["output"]) for r in rows] == \
        [len(i) for i in made["input_ids"]]


def test_the_default_cutoff_len_is_llamafactorys_when_the_recipe_sets_none(local_model):
    from llamafactory.hparams import DataArguments

    from e2e_llm.compat.llamafactory import row_encoder

    encoder = row_encoder({"model_name_or_path": str(local_model), "template": "smollm2"})
    assert encoder.cutoff_len == DataArguments().cutoff_len


def test_the_engines_context_is_named_only_where_the_cutoff_that_fits_exceeds_it():
    from e2e_llm.train_rows import RowLengths, over_cutoff_message

    found = RowLengths("data/train.jsonl", 512, 512, 100, 3, 700, 42)
    fits = over_cutoff_message(found, "recipe.yaml", "profile.yaml", max_model_len=4096)
    assert "3 of the 100 rows this run trains on are longer" in fits and "line 42, 700 tokens" in fits
    assert "--set cutoff_len=704" in fits and "max_model_len" not in fits
    assert "model.max_model_len 640: raise that too" in over_cutoff_message(found, "r", "p", max_model_len=640)


@pytest.mark.parametrize("template", ["smollm2", "chatml", "qwen"])
def test_templates_that_format_as_the_model_does_train(profile, template):
    """SmolLM2's chat template is ChatML: LLaMA-Factory's smollm2, chatml and qwen templates make
    the same prompts (with a system message, as every row has)."""
    from e2e_llm.train import plan_run

    plan = plan_run(profile(), overrides={"template": template, "max_samples": LONG_LINE - 1})
    assert plan.training_rows["prompt_format"]["mismatch_line"] is None


def test_a_template_that_formats_otherwise_than_the_model_is_refused_showing_where(profile):
    """`llama3` on a ChatML model: the engines would ask the adapter in another format than it learned."""
    from e2e_llm.train import TrainError, plan_run
    from e2e_llm.train_rows import notices

    config = profile()
    with pytest.raises(TrainError) as refused:
        plan_run(config, overrides={"template": "llama3", "max_samples": LONG_LINE - 1})
    message = str(refused.value)
    assert re.search(r"the recipe's LLaMA-Factory template 'llama3' formats the prompt of \S+/viggo/train\.jsonl "
                     r"line 1 otherwise than smollm2-135m's own chat template, which the batch and serving "
                     r"engines \(vLLM\) ask with: from character 12 training has '<\|start_header_id\|>system",
                     message), message
    assert "and the engines 'system\\nWrite the meaning" in message
    assert "train.prompt_format_mismatch: allow" in message and str(config.source_file) in message

    allowed = plan_run(profile(train__prompt_format_mismatch="allow"),
                       overrides={"template": "llama3", "max_samples": LONG_LINE - 1})
    prompts = allowed.training_rows["prompt_format"]
    assert (prompts["mismatch_line"], prompts["at"], prompts["policy"]) == (1, 12, "allow")
    assert notices(allowed.training_rows) == [
        "the recipe's template 'llama3' formats prompts otherwise than the model's own chat template from "
        "character 12 (line 1): trained anyway (train.prompt_format_mismatch: allow)"]


def test_a_model_whose_template_adds_text_of_its_own_is_found(local_model, tmp_path):
    """As Llama 3.1's template puts date lines into every system message, which no LLaMA-Factory
    template writes: here the same model with a template of ours that does so."""
    import shutil

    from e2e_llm.compat.llamafactory import row_encoder
    from e2e_llm.train_rows import compare_prompts

    dated = tmp_path / "dated-model"
    shutil.copytree(local_model, dated)
    tokenizer_config = json.loads((dated / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'system' %}Today: 7 Dec 2026\n\n"
        "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    (dated / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (dated / "chat_template.jinja").unlink(missing_ok=True)
    from transformers import AutoTokenizer

    rows = [(1, {"instruction": "Say it.", "input": "a sentence", "output": "inform(name[x])"})]
    found = compare_prompts(row_encoder({"model_name_or_path": str(dated), "template": "smollm2"}),
                            AutoTokenizer.from_pretrained(dated), rows, "train.jsonl", "smollm2")
    assert (found.mismatch_line, found.at) == (1, len("<|im_start|>system\n"))
    assert found.training.startswith("Say it.") and found.serving.startswith("Today: 7 Dec 2026")


def test_a_model_without_a_chat_template_of_its_own_is_said_to_be_unchecked(profile, local_model, tmp_path):
    """A base (not instruct) checkpoint: the engines have no chat format to compare with; the run
    says so and trains."""
    from e2e_llm.train import plan_run
    from e2e_llm.train_rows import notices

    base = tmp_path / "base-model"
    base.mkdir()
    for item in local_model.iterdir():
        if item.name not in ("tokenizer_config.json", "chat_template.jinja"):
            (base / item.name).symlink_to(item)
    tokenizer_config = json.loads((local_model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    plan = plan_run(profile(model__source=str(base)), overrides={"max_samples": LONG_LINE - 1})
    prompts = plan.training_rows["prompt_format"]
    assert prompts["checked"] is False and "chat_template" in prompts["why"]
    assert notices(plan.training_rows) == [f"prompt format not compared with the engines' ({prompts['why']})"]


def test_a_template_llamafactory_does_not_have_is_refused_naming_the_recipe(profile):
    from e2e_llm.train import TrainError, plan_run

    config = profile()
    with pytest.raises(TrainError, match=r"smollm2_lora_sft_local\.yaml: Template nonesuch does not exist"):
        plan_run(config, overrides={"template": "nonesuch", "max_samples": LONG_LINE - 1})
