# SPDX-License-Identifier: Apache-2.0
"""The LLaMA-Factory names in e2e_llm.compat.llamafactory: each resolves in the pinned release,
an upgrade that removes or re-signs one fails with the entry's name, and run_exp really trains
in-process with our callbacks while USE_RAY is off (and we refuse to call it when it is on)."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

pytestmark = pytest.mark.train
pytest.importorskip("llamafactory")

from e2e_llm.compat import CompatError, resolve  # noqa: E402
from e2e_llm.compat import llamafactory as compat  # noqa: E402

OWNER = "e2e_llm.compat.llamafactory"


def test_every_llamafactory_name_resolves_in_the_pinned_release():
    assert compat.check() == []


def test_a_removed_run_exp_fails_naming_the_entry(monkeypatch):
    tuner = importlib.import_module("llamafactory.train.tuner")
    monkeypatch.delattr(tuner, "run_exp")
    with pytest.raises(CompatError, match=r"llamafactory\.train\.tuner\.run_exp: 'run_exp' no longer exists; update "
                                          r"the entry in e2e_llm\.compat\.llamafactory"):
        compat.run_training({}, [])
    assert any("run_exp" in m for m in compat.check())


def test_a_changed_run_exp_signature_fails_with_expected_and_found(monkeypatch):
    tuner = importlib.import_module("llamafactory.train.tuner")
    monkeypatch.setattr(tuner, "run_exp", lambda args=None, callbacks=None, ray_args=None: None)
    with pytest.raises(CompatError, match=r"signature changed, expected \(args, callbacks\), found "
                                          r"\(args, callbacks, ray_args\)"):
        resolve(compat.RUN_EXP, OWNER)


def test_a_removed_argument_class_fails_the_recipe_key_check(monkeypatch):
    hparams = importlib.import_module("llamafactory.hparams")
    monkeypatch.delattr(hparams, "GeneratingArguments")
    with pytest.raises(CompatError, match="GeneratingArguments' no longer exists"):
        compat.recipe_field_types()


def test_recipe_keys_are_the_fields_llamafactorys_train_parser_reads():
    from llamafactory.hparams.parser import _TRAIN_ARGS  # what get_train_args parses (private: checked here only)

    types = compat.recipe_field_types()
    assert set(types) == {f.name for cls in _TRAIN_ARGS for f in dataclasses.fields(cls)}
    assert {"lora_rank", "output_dir", "dataset_dir", "template"} <= set(types)
    assert types["learning_rate"] is float and types["lora_rank"] is int and types["bf16"] is bool


def test_recipes_and_overrides_are_read_as_llamafactory_cli_reads_them(monkeypatch, tmp_path):
    """Our reader against LLaMA-Factory's own (``read_args``, which reads sys.argv): the same dict
    for the same recipe and key=value items, with the YAML cases where PyYAML differs."""
    from llamafactory.hparams import read_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 1e-4\nnum_train_epochs: 3\nbf16: true\ntemplate: llama3\n"
                      "lora_target: all\nwarmup_ratio: .1\n")
    items = ["learning_rate=2e-4", "max_samples=32", "template=qwen"]
    monkeypatch.setattr("sys.argv", ["llamafactory-cli", str(recipe), *items])
    assert {**compat.read_recipe_file(recipe), **compat.read_overrides(items)} == read_args()
    monkeypatch.setattr("sys.argv", ["llamafactory-cli", str(recipe)])
    assert compat.read_recipe_file(recipe) == read_args()
    assert compat.read_recipe_file(recipe)["learning_rate"] == 1e-4  # PyYAML: the string "1e-4"


def test_run_exp_trains_in_process_with_our_callbacks_while_use_ray_is_off(monkeypatch):
    tuner = importlib.import_module("llamafactory.train.tuner")
    calls = []
    monkeypatch.setattr(tuner, "_training_function", lambda config: calls.append(config))
    monkeypatch.setattr(tuner, "_ray_training_function", lambda *a, **k: pytest.fail("took the USE_RAY path"))
    monkeypatch.delenv(compat.USE_RAY_ENV, raising=False)
    callback = object()
    compat.run_training({"stage": "sft", "lora_rank": 8}, [callback])
    assert calls == [{"args": {"stage": "sft", "lora_rank": 8}, "callbacks": [callback]}]


def test_use_ray_in_a_worker_is_refused_before_llamafactory_starts_anything(monkeypatch):
    tuner = importlib.import_module("llamafactory.train.tuner")
    monkeypatch.setattr(tuner, "_training_function", lambda config: pytest.fail("trained"))
    monkeypatch.setenv(compat.USE_RAY_ENV, "1")
    with pytest.raises(RuntimeError, match=r"\$USE_RAY is set in a Ray Train worker"):
        compat.run_training({"stage": "sft"}, [])
    assert compat.use_ray_enabled({"USE_RAY": "true"}) and not compat.use_ray_enabled({"USE_RAY": "0"})


def test_training_workers_get_use_ray_off(local_config, monkeypatch):
    from e2e_llm.train import worker_env

    monkeypatch.setenv(compat.USE_RAY_ENV, "1")
    assert worker_env(local_config)[compat.USE_RAY_ENV] == "0"


def test_cpu_training_workers_run_at_normal_priority_gpu_ones_at_rays(local_config):
    from e2e_llm.serve import RAY_WORKER_NICENESS_ENV
    from e2e_llm.train import worker_env

    assert not local_config.train.use_gpu and worker_env(local_config)[RAY_WORKER_NICENESS_ENV] == "0"
    gpu = local_config.model_copy(update={"train": local_config.train.model_copy(update={"use_gpu": True})})
    assert RAY_WORKER_NICENESS_ENV not in worker_env(gpu)


def test_serving_reads_each_recipes_lora_rank_as_training_does(local_config, project_root):
    """The serve environment has no OmegaConf: its PyYAML read of ``lora_rank`` must agree."""
    from e2e_llm.serve import recipe_lora_rank

    recipes = sorted((project_root / "configs/recipes").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        config = local_config.model_copy(deep=True)
        config.train.recipe = str(recipe)
        assert recipe_lora_rank(config) == compat.read_recipe_file(recipe).get("lora_rank", 8), recipe
