# SPDX-License-Identifier: Apache-2.0
"""Bad training input fails before any worker starts, with a clear message."""

import re
from pathlib import Path

import pytest
import yaml

from e2e_llm.config import load_profile

pytestmark = pytest.mark.train


@pytest.fixture()
def profile(local_profile, local_model):
    return local_profile


def _ingested(config):
    from e2e_llm.data import ingest

    ingest(source=str(config.path(config.data.source)), splits={"train": "train.jsonl", "val": "val.jsonl"},
           output_dir=Path(config.storage_uri("data", "viggo")), task=config.task_schema(), dataset="viggo",
           system_prompt=config.data.system_prompt)  # as `e2e-llm data` writes it
    return config


def test_missing_dataset(profile):
    from e2e_llm.train import TrainError, plan_run

    with pytest.raises(TrainError, match="dataset not found .* run `e2e-llm data"):
        plan_run(profile())


def test_model_path_that_does_not_exist(profile):
    from e2e_llm.train import TrainError, plan_run

    with pytest.raises(TrainError, match="model path /nope/model does not exist"):
        plan_run(_ingested(profile(model__source="/nope/model")))


def test_unknown_llamafactory_key_suggests_the_right_one(profile):
    from e2e_llm.train import TrainError, plan_run

    with pytest.raises(TrainError, match="unknown LLaMA-Factory key 'lora_rnak' \\(did you mean 'lora_rank'\\?\\)"):
        plan_run(_ingested(profile()), overrides={"lora_rnak": 8})


def test_ray_keys_belong_in_the_profile(profile):
    from e2e_llm.train import TrainError, plan_run

    with pytest.raises(TrainError, match="'ray_num_workers' is a Ray setting"):
        plan_run(_ingested(profile()), overrides={"ray_num_workers": 4})


def test_zero_gpus_on_a_gpu_profile(profile):
    from e2e_llm.train import TrainError, plan_run

    with pytest.raises(TrainError, match="use_gpu is true but resources_per_worker.GPU is 0"):
        plan_run(profile(train__use_gpu=True, train__resources_per_worker={"CPU": 1, "GPU": 0}))


def test_unsupported_storage_scheme(project_root, monkeypatch):
    from e2e_llm.config import ConfigError

    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", "ftp://host/x")
    with pytest.raises(ConfigError, match="unsupported storage scheme 'ftp'"):
        load_profile("local", root=project_root)


def test_plan_overrides_only_deployment_keys(profile):
    from e2e_llm.train import plan_run

    config = _ingested(profile())
    plan = plan_run(config)
    recipe = yaml.safe_load(config.path(config.train.recipe).read_text())
    for key, value in recipe.items():
        assert plan.args[key] == value, key
    assert plan.args["dataset"] == "viggo-train" and plan.args["eval_dataset"] == "viggo-val"
    assert plan.args["model_name_or_path"].endswith("smollm2-135m")


def test_token_count_survives_neat_packing(profile):
    """transformers' non_padding count sums neat packing's 4-D mask (negative on the GPU recipes)."""
    from e2e_llm.train import plan_run

    config = _ingested(profile())
    assert plan_run(config).args["include_num_input_tokens_seen"] == "non_padding"
    packed = plan_run(config, overrides={"packing": True, "neat_packing": True})
    assert packed.args["include_num_input_tokens_seen"] == "all"
    explicit = plan_run(config, overrides={"neat_packing": True, "include_num_input_tokens_seen": "no"})
    assert explicit.args["include_num_input_tokens_seen"] == "no"


def test_closing_evaluation_is_read_from_all_results(tmp_path):
    """The local recipe evaluates once, after training: that eval_loss is only in all_results.json."""
    import json

    from e2e_llm.train_report import read_log, read_state

    history = [{"step": 2, "loss": 2.5}, {"step": 4, "loss": 1.5}, {"step": 4, "train_runtime": 9.0}]
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": history}))
    train, evals = read_log(read_state(str(tmp_path), {}), str(tmp_path), {})
    assert [h["loss"] for h in train] == [2.5, 1.5] and evals == []

    (tmp_path / "all_results.json").write_text(json.dumps({"eval_loss": 1.25, "train_loss": 2.0}))
    train, evals = read_log(read_state(str(tmp_path), {}), str(tmp_path), {})
    assert evals == [{"step": 4, "eval_loss": 1.25}]

    # an in-training evaluation at the last step is not counted twice
    history.append({"step": 4, "eval_loss": 1.25})
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": history}))
    assert len(read_log(read_state(str(tmp_path), {}), str(tmp_path), {})[1]) == 1


def test_plan_records_the_machine_dtype_and_derives_precision_keys(profile, local_config, local_model):
    from e2e_llm.precision import model_dtype
    from e2e_llm.train import plan_run

    plan = plan_run(_ingested(profile()))
    assert plan.dtype["dtype"] == model_dtype(local_config).dtype and plan.dtype["reason"]
    assert plan.dtype["signals"]["cpu_capability"]
    assert plan.args["bf16"] is False and plan.args["fp16"] is False  # CPU: the checkpoint's own dtype


def test_a_checkpoint_in_another_dtype_is_refused_on_cpu(profile, local_config, local_model):
    from e2e_llm.precision import model_dtype
    from e2e_llm.train import TrainError, plan_run

    other = "float32" if model_dtype(local_config).dtype == "bfloat16" else "bfloat16"
    with pytest.raises(TrainError, match=f"prepared in .* but this machine trains in {other}.*e2e-llm model"):
        plan_run(_ingested(profile(model__dtype=other)))


def test_a_gpu_recipe_may_not_contradict_the_dtype(profile, tmp_path):
    from e2e_llm.train import TrainError, plan_run

    recipe = yaml.safe_load((Path(__file__).parents[2] / "configs/recipes/smollm2_lora_sft_local.yaml").read_text())
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "bf16": True}))
    config = _ingested(profile(model__dtype="float16", train__recipe=str(tmp_path / "recipe.yaml"),
                               train__use_gpu=True, train__resources_per_worker={"CPU": 1, "GPU": 1}))
    with pytest.raises(TrainError, match="bf16: True contradicts the training dtype float16 on cuda"):
        plan_run(config)


def test_a_failed_runs_error_names_the_workers_exception():
    from e2e_llm.train import failure_cause

    ray_message = ("Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\nTraceback (most recent call "
                   "last):\n  File \"x.py\", line 1, in f\n... (Output truncated) ...\nValueError: Template t does "
                   "not exist.\n\n")
    assert failure_cause(RuntimeError(ray_message)) == "ValueError: Template t does not exist."
    assert failure_cause(RuntimeError("")) == "RuntimeError"


def _with_line(recipe_text: str, line: str) -> str:
    """The recipe with ``line``'s key set to its value (the key's own line replaced, or added)."""
    key = line.split(":", 1)[0]
    kept = [old for old in recipe_text.splitlines() if not old.startswith(f"{key}:")]
    return "\n".join([*kept, line]) + "\n"


def test_numbers_are_read_as_llamafactory_reads_them(profile, tmp_path):
    """``1e-4`` is a float to LLaMA-Factory's own reader (PyYAML reads a string, which crashed every
    worker): in the recipe file and on the command line alike."""
    from e2e_llm.train import parse_overrides, plan_run

    config = _ingested(profile())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_with_line(config.path(config.train.recipe).read_text(), "learning_rate: 1e-4"))
    config.train.recipe = str(recipe)
    assert plan_run(config).args["learning_rate"] == 1e-4
    overrides = parse_overrides(["learning_rate=2e-4", "max_samples=32", "template=qwen"])
    assert overrides == {"learning_rate": 2e-4, "max_samples": 32, "template": "qwen"}
    assert plan_run(config, overrides=overrides).args["learning_rate"] == 2e-4


@pytest.mark.parametrize(("override", "message"), [
    ("learning_rate=abc", "--set: 'learning_rate' must be float, got 'abc'"),
    ("max_steps=10.5", "--set: 'max_steps' must be int, got 10.5"),
    ("bf16=maybe", "--set: 'bf16' must be bool, got 'maybe'"),
    ("lora_rnak=8", "--set: unknown LLaMA-Factory key 'lora_rnak'"),  # the override, not the recipe file
])
def test_a_mistyped_value_fails_before_any_worker_names_where_it_came_from(profile, override, message):
    from e2e_llm.train import TrainError, parse_overrides, plan_run

    with pytest.raises(TrainError, match=re.escape(message)):
        plan_run(_ingested(profile()), overrides=parse_overrides([override]))


def test_a_mistyped_value_in_the_recipe_names_the_recipe(profile, tmp_path):
    from e2e_llm.train import TrainError, plan_run

    config = _ingested(profile())
    recipe = tmp_path / "recipe.yaml"
    text = config.path(config.train.recipe).read_text()
    recipe.write_text(_with_line(text, "num_train_epochs: three"))
    config.train.recipe = str(recipe)
    with pytest.raises(TrainError, match=re.escape(f"{recipe}: 'num_train_epochs' must be float, got 'three'")):
        plan_run(config)
    recipe.write_text("lora_rank: [8\n")
    with pytest.raises(TrainError, match=re.escape(f"{recipe}, line 2: not a readable recipe: did not find")):
        plan_run(config)
    recipe.write_text("lora_rank: 8\nlora_rank: 16\n")  # PyYAML kept the last one silently
    with pytest.raises(TrainError, match=re.escape(f"{recipe}, line 2: not a readable recipe: found duplicate key")):
        plan_run(config)


def test_optional_numbers_may_be_null(profile):
    from e2e_llm.train import parse_overrides, plan_run

    assert plan_run(_ingested(profile()), overrides=parse_overrides(["max_samples=null"])).args["max_samples"] is None


def test_keys_each_run_sets_are_refused_on_the_command_line(profile):
    """``--set model_name_or_path=...`` would otherwise be overwritten by the profile's model without
    a word: it names what to change instead."""
    from e2e_llm.train import TrainError, parse_overrides, plan_run

    config = _ingested(profile())
    for override, instead in (("model_name_or_path=Qwen/Qwen2.5-7B-Instruct", "model.source in the profile"),
                              ("output_dir=/tmp/out", "storage.root in the profile"),
                              ("resume_from_checkpoint=/tmp/ckpt", "--run-id")):
        with pytest.raises(TrainError, match=re.escape(f"is set for each run by e2e-llm train; change {instead}")):
            plan_run(config, overrides=parse_overrides([override]))


def test_a_recipe_written_for_llamafactory_cli_trains_on_the_profiles_model_and_data(profile, tmp_path):
    """A recipe copied from LLaMA-Factory's examples names its own model, dataset, output and
    checkpoint. The run uses the profile's (a stale resume_from_checkpoint would resume another run)
    and names the keys it did not use."""
    from e2e_llm.model import resolve_model_path
    from e2e_llm.train import plan_run

    config = _ingested(profile(train__eval_split=None))
    assert plan_run(config).replaced_keys == []  # our own recipes leave them to the profile
    recipe = tmp_path / "recipe.yaml"
    text = config.path(config.train.recipe).read_text()
    for line in ("model_name_or_path: Qwen/Qwen2.5-7B-Instruct", "dataset: alpaca_en_demo",
                 "eval_dataset: alpaca_en_demo", "dataset_dir: data", "output_dir: saves/qwen/lora/sft",
                 "resume_from_checkpoint: saves/qwen/lora/sft/checkpoint-100"):
        text = _with_line(text, line)
    recipe.write_text(text)
    config.train.recipe = str(recipe)
    plan = plan_run(config)
    assert plan.replaced_keys == ["model_name_or_path", "dataset", "eval_dataset", "dataset_dir", "output_dir",
                                  "resume_from_checkpoint"]
    assert plan.args["model_name_or_path"] == resolve_model_path(config.model, root=config.root)
    assert plan.args["dataset"] == "viggo-train"
    # No eval split; the rest set in the worker.
    for key in ("eval_dataset", "dataset_dir", "output_dir", "resume_from_checkpoint"):
        assert key not in plan.args


def test_a_worker_group_this_machines_ray_cannot_hold_fails_at_once(profile):
    """2 workers x 2 CPUs on a 2-CPU local Ray: Ray Train waited 60 s, failed, and tried again for
    ever. It is an error naming the profile's numbers before any worker is asked for."""
    from e2e_llm.train import workers_do_not_fit

    config = profile(train__resources_per_worker={"CPU": 2})
    problem = workers_do_not_fit(config, {"CPU": 2.0, "memory": 1e10})
    assert problem == (f"{config.source_file}: train.num_workers 2 x CPU 2 a worker (resources_per_worker) = 4 CPU, "
                       "and this machine's Ray instance has 2: lower them, or set RAY_ADDRESS to a cluster that "
                       "has them")
    assert workers_do_not_fit(config, {"CPU": 4.0}) is None
    gpu = profile(train__use_gpu=True, train__resources_per_worker={"CPU": 1})
    assert "= 2 GPU, and this machine's Ray instance has 0" in workers_do_not_fit(gpu, {"CPU": 2.0})
    assert workers_do_not_fit(profile(), {"CPU": 2.0}) is None  # the local profile as shipped


def test_a_worker_group_over_a_containers_cpu_limit_is_refused_naming_the_limit(profile, monkeypatch):
    """Inside `docker run --cpus 2` on a 16-core host the local Ray instance has 2 CPUs (not 16):
    the refusal says why this machine has fewer CPUs than it shows."""
    from e2e_llm import host_cpus, train

    monkeypatch.setattr(train, "cpu_budget", lambda: host_cpus.CpuBudget(tuple(range(16)), 16, 2.0, "cpu cgroup /ci"))
    problem = train.workers_do_not_fit(profile(train__resources_per_worker={"CPU": 2}), {"CPU": 2.0})
    assert problem.endswith("= 4 CPU, and this machine's Ray instance has 2 (2 of this machine's 16 CPUs: a CPU "
                            "quota of 2 applies (cpu cgroup /ci)): lower them, or set RAY_ADDRESS to a cluster "
                            "that has them")


def test_a_dataset_written_before_the_profile_changed_is_refused(profile, tmp_path):
    """`data.system_prompt` or the task schema edited after `e2e-llm data`: training would learn to
    answer the old prompt, or rows validated by the old schema. It names what changed and the fix."""
    from e2e_llm.train import TrainError, plan_run

    config = _ingested(profile())
    plan_run(config)
    config.data.system_prompt = "A new prompt."
    with pytest.raises(TrainError, match=re.escape("the dataset was written with data.system_prompt 'Write the "
                                                   "meaning representation of the sentence.' and the profile now "
                                                   "says 'A new prompt.': rerun `e2e-llm data --profile local`")):
        plan_run(config)

    config = _ingested(profile())
    task = tmp_path / "task.yaml"
    task.write_text(config.path(config.data.task).read_text().replace("  recommend: {}\n", ""))
    config.data.task = str(task)
    with pytest.raises(TrainError, match="validated with another version of the task schema .*task.yaml: rerun"):
        plan_run(config)


def test_the_work_dir_is_cleared_from_the_nodes_only_where_it_is_their_own_disk(monkeypatch, capsys):
    """Remote storage puts each run's work dir on every node's own disk, local storage in the run's
    folder: only the first is removed when the run is done, and a node that does not answer (or a
    cluster already gone) leaves a warning, never an error in place of the run's own outcome."""
    from e2e_llm import train

    asked = []

    def no_answer(fn, run_id, timeout_s):
        asked.append(run_id)
        return None

    def cluster_gone(fn, run_id, timeout_s):
        raise ConnectionError("GCS unreachable")

    remote = train.TrainPlan("r1", "s3://b/runs/r1", None, "s3://b/data", {}, "recipe.yaml", {})
    local = train.TrainPlan("r2", "/data/runs/r2", "/data/runs/r2/work", "/data/data", {}, "recipe.yaml", {})
    monkeypatch.setattr(train, "on_every_node", no_answer)
    train.clear_work_dirs(local)
    assert asked == [] and capsys.readouterr().out == ""
    train.clear_work_dirs(remote, timeout_s=5)
    assert asked == ["r1"]
    assert ("warning: the run's workers' folder (train-work/r1 in each node's temp folder) not removed from "
            "every node within 5 s") in capsys.readouterr().out
    monkeypatch.setattr(train, "on_every_node", cluster_gone)
    train.clear_work_dirs(remote)
    assert "not removed from every node: GCS unreachable" in capsys.readouterr().out

