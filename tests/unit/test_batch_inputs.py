# SPDX-License-Identifier: Apache-2.0
"""Batch stage inputs, checked before any engine starts: splits, rows, adapters, settings."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from e2e_llm.batch import (
    BatchError,
    check_adapter,
    engine_kwargs,
    load_rows,
    previous_batch_metrics,
    resolve_split,
    sampling_params,
)

SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
        "num_hidden_layers": 30, "model_type": "llama"}


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def fake_model(tmp_path: Path, name: str = "smollm2-135m", **overrides) -> Path:
    model = tmp_path / name
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(SMOL | overrides))
    return model


def fake_adapter(tmp_path: Path, base: str, in_features: int = 576, layer: int = 0, rank: int = 8) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": rank, "base_model_name_or_path": base,
                                                             "peft_type": "LORA"}))
    write_safetensors(adapter / "adapter_model.safetensors", {
        f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight": [rank, in_features],
        f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.weight": [576, rank],
    })
    return adapter


def test_split_names_resolve_to_clean_files_and_unknown_names_fail(config):
    with pytest.raises(BatchError, match=r"split 'val': .*val.jsonl not found \(run `e2e-llm data"):
        resolve_split(config, "val")
    with pytest.raises(BatchError, match=r"unknown split 'dev' \(known: train, val, test"):
        resolve_split(config, "dev")
    with pytest.raises(BatchError, match="missing.jsonl: file not found"):
        resolve_split(config, "/nowhere/missing.jsonl")
    val = Path(config.storage_uri("data", "viggo", "val.jsonl"))
    val.parent.mkdir(parents=True)
    val.write_text('{"input": "x"}\n')
    assert resolve_split(config, "val") == str(val)
    # Written before the profile's system prompt changed: scoring would ask the old way.
    (val.parent / "ingest_report.json").write_text(json.dumps({"system_prompt": "An older prompt."}))
    with pytest.raises(BatchError, match=r"split 'val': the dataset was written with data.system_prompt 'An older "
                                         r"prompt.' and the profile now says .*: rerun `e2e-llm data"):
        resolve_split(config, "val")


def test_empty_dataset_is_a_clear_error(config, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(BatchError, match=r"empty.jsonl: no rows \(empty dataset\)"):
        load_rows(config, str(empty))


def test_rows_without_input_are_kept_and_flagged_with_file_and_line(config, tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [
        {"instruction": "s", "input": "good row", "output": "inform(name[A])", "id": 7},
        {"instruction": "s", "output": "inform(name[B])"},
        {"input": "   "},
        "not json",
        [1, 2],
        {"input": "ok", "instruction": 3},
        {"input": "ok", "output": 5},
        {"input": "ok", "output": None},  # no reference: fine (unlabelled)
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    data = load_rows(config, str(path))
    assert len(data.rows) == 8  # nothing dropped
    assert [r["_line"] for r in data.rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert data.rows[0]["id"] == 7 and 1 not in data.invalid
    assert data.invalid[2].endswith("rows.jsonl:2: field 'input' missing or empty")
    assert "rows.jsonl:3: field 'input'" in data.invalid[3]
    assert "rows.jsonl:4: invalid JSON" in data.invalid[4]
    assert "rows.jsonl:5: row must be a JSON object" in data.invalid[5]
    assert "field 'instruction' must be a string" in data.invalid[6]
    assert "rows.jsonl:7: field 'output' (the reference) must be a string" in data.invalid[7]
    assert 8 not in data.invalid
    assert load_rows(config, str(path), limit=2).rows[-1]["_line"] == 2


def test_adapter_checks_name_files_and_shapes(config, tmp_path):
    model = fake_model(tmp_path / "models")
    good = fake_adapter(tmp_path / "a", base=str(model))
    adapter = check_adapter(config, good, str(model))
    assert adapter.rank == 8 and len(adapter.sha256) == 64

    with pytest.raises(BatchError, match="directory not found"):
        check_adapter(config, tmp_path / "nope", str(model))
    broken = fake_adapter(tmp_path / "b", base=str(model))
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(BatchError, match=r"not a LoRA adapter folder \(missing adapter_model.safetensors\)"):
        check_adapter(config, broken, str(model))


def test_an_adapters_shapes_are_checked_against_a_base_model_kept_in_s3(config, tmp_path, s3_server, monkeypatch):
    """model.source s3://...: the base model's config comes from a copy without weights."""
    import tempfile
    import uuid

    from e2e_llm import storage

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the machine's temp dir: the copy goes there
    storage.filesystem("s3://e2e-models")[0].create_dir("e2e-models")
    uri = f"s3://e2e-models/{uuid.uuid4().hex[:8]}/smollm2-135m"
    storage.upload_dir(fake_model(tmp_path / "models"), uri)
    assert check_adapter(config, fake_adapter(tmp_path / "a", base="smollm2-135m"), uri).rank == 8
    renamed = fake_adapter(tmp_path / "r", base="smollm2-135m", in_features=3584)
    with pytest.raises(BatchError, match=r"does not fit base model 'smollm2-135m'.*input size 3584"):
        check_adapter(config, renamed, uri)
    # A store this machine cannot read (or no model there): the names are checked, the shapes cannot be.
    assert check_adapter(config, renamed, uri.replace("e2e-models", "no-such-bucket")).rank == 8


def test_adapter_for_another_base_model_is_rejected(config, tmp_path):
    model = fake_model(tmp_path / "models")
    qwen = fake_adapter(tmp_path / "q", base="Qwen/Qwen2.5-7B-Instruct", in_features=3584)
    with pytest.raises(BatchError, match=r"trained for another base model: adapter_config.json "
                                         r"base_model_name_or_path is 'Qwen/Qwen2.5-7B-Instruct'"):
        check_adapter(config, qwen, str(model))
    # Same name but the tensors do not fit (a renamed or mislabelled base).
    renamed = fake_adapter(tmp_path / "r", base="smollm2-135m", in_features=3584)
    with pytest.raises(BatchError, match=r"does not fit base model 'smollm2-135m'.*input size 3584"):
        check_adapter(config, renamed, str(model))
    deep = fake_adapter(tmp_path / "d", base="smollm2-135m", layer=31)
    with pytest.raises(BatchError, match="targets layer 31, the model has 30"):
        check_adapter(config, deep, str(model))
    manifest = {"base_model": {"id": "qwen2.5-7b-instruct"}}
    with pytest.raises(BatchError, match="run manifest base_model.id is 'qwen2.5-7b-instruct'"):
        check_adapter(config, fake_adapter(tmp_path / "m", base=str(model)), str(model), manifest)


def test_sampling_params_are_greedy_and_structured_from_the_task(config, viggo_task):
    params = sampling_params(config, viggo_task)
    assert params["temperature"] == 0.0 and params["max_tokens"] >= 128
    assert params["structured_outputs"] == {"regex": viggo_task.output_regex()}
    assert "structured_outputs" not in sampling_params(config, viggo_task, structured=False)


def test_engine_kwargs_enable_lora_only_in_lora_mode(config, tmp_path):
    from e2e_llm.batch import Adapter

    adapter = Adapter(path=tmp_path, sha256="0" * 64, rank=12, base_model=None)
    merged = engine_kwargs(config, adapter, "merged")
    assert "enable_lora" not in merged and merged["max_model_len"] == config.model.max_model_len
    lora = engine_kwargs(config, adapter, "lora")
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 16


def test_processor_config_schedules_on_cpu_without_a_gpu(config):
    pytest.importorskip("ray.data.llm")
    from e2e_llm.batch import processor_config

    cfg = processor_config(config, "/models/x", None, "merged")
    assert [b.get("GPU", 0) for b in cfg.placement_group_config["bundles"]] == [0]
    assert cfg.accelerator_type is None and cfg.should_continue_on_error is True
    assert "tensor_parallel_size" not in cfg.engine_kwargs


def test_processor_config_from_the_cluster_profile_uses_its_gpu_settings(project_root, monkeypatch):
    pytest.importorskip("ray.data.llm")
    from e2e_llm.batch import processor_config
    from e2e_llm.config import load_profile

    monkeypatch.delenv("E2E_LLM_STORAGE_ROOT", raising=False)
    config = load_profile("cluster", root=project_root)
    source = config.storage_uri("merged", "qwen2.5-7b-instruct-0123456789abcdef-bfloat16")
    cfg = processor_config(config, source, None, "merged")
    assert cfg.model_source == "s3://e2e-llm-artifacts/viggo/merged/qwen2.5-7b-instruct-0123456789abcdef-bfloat16"
    assert (cfg.accelerator_type, cfg.concurrency, cfg.batch_size) == ("L4", 4, 64) == (
        config.batch.accelerator_type, config.batch.concurrency, config.batch.batch_size)
    # No CPU placement group: Ray's default reserves one {"GPU": 1, "CPU": 1} bundle per
    # tensor-parallel worker, i.e. num_gpus_per_engine GPUs per engine.
    assert cfg.placement_group_config is None
    assert cfg.engine_kwargs["tensor_parallel_size"] == config.batch.num_gpus_per_engine == 1
    assert cfg.engine_kwargs["dtype"] == "bfloat16" and cfg.engine_kwargs["max_model_len"] == 4096
    # the engine can schedule every row Ray Data keeps in flight
    assert cfg.max_concurrent_batches == config.batch.max_concurrent_batches
    assert cfg.engine_kwargs["max_num_seqs"] == cfg.batch_size * cfg.max_concurrent_batches

    config.batch.num_gpus_per_engine = 2
    assert processor_config(config, source, None, "merged").engine_kwargs["tensor_parallel_size"] == 2


def test_previous_run_is_the_newest_over_the_same_data(config):
    root = Path(config.storage_uri("batch"))
    for run_id, finished, uri in [("a", "2026-01-01", "/d/val.jsonl"), ("b", "2026-01-03", "/d/val.jsonl"),
                                  ("c", "2026-01-05", "/d/test.jsonl"), ("now", "2026-01-09", "/d/val.jsonl")]:
        (root / run_id).mkdir(parents=True)
        (root / run_id / "manifest.json").write_text(json.dumps(
            {"finished_at": finished, "data": {"uri": uri}, "metrics": {"exact_match": len(run_id)}}))
    assert previous_batch_metrics(config, "/d/val.jsonl", exclude="now") == ("b", {"exact_match": 1})
    assert previous_batch_metrics(config, "/d/other.jsonl", exclude="now") is None


def test_batch_cli_reports_bad_input_without_starting_an_engine(project_root, monkeypatch, capsys, tmp_path):
    from e2e_llm.cli import main

    monkeypatch.chdir(project_root)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path))
    assert main(["batch", "--profile", "local", "--adapter", "none", "--split", "nosuch"]) == 1
    assert "unknown split 'nosuch'" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input": "x"}\n')
    assert main(["batch", "--profile", "local", "--adapter", str(tmp_path / "gone"), "--split", str(rows)]) == 1
    assert "gone" in capsys.readouterr().err


def test_batch_cli_interrupted_says_nothing_was_written_and_exits_130(project_root, monkeypatch, capsys, tmp_path):
    """Ctrl-C was a Ray Data traceback with status 1."""
    import e2e_llm.batch
    from e2e_llm.cli import INTERRUPTED, main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(e2e_llm.batch, "run_batch", interrupted)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path))
    assert main(["batch", "--profile", "local", "--adapter", "none"]) == INTERRUPTED == 130
    assert capsys.readouterr().err == "error: interrupted; no results were written (a rerun starts over)\n"


def test_store_alias_resolves_to_the_published_adapter(config, s3_server, tmp_path, monkeypatch):
    import uuid

    from e2e_llm.batch import resolve_adapter
    from e2e_llm.store import AdapterStore

    monkeypatch.setenv("E2E_LLM_CACHE", str(tmp_path / "cache"))
    config.storage.adapters = f"s3://batch-{uuid.uuid4().hex[:8]}/adapters"
    config.storage.endpoint_url = s3_server
    model = fake_model(tmp_path / "models")
    store = AdapterStore.from_config(config)
    store.publish(fake_adapter(tmp_path / "a", base=str(model)), name="viggo", alias="prod",
                  manifest={"run_id": "r1", "base_model": {"id": "smollm2-135m"}})
    adapter = resolve_adapter(config, "store:prod", str(model))
    assert adapter.path.name == "viggo-v1" and adapter.manifest["run_id"] == "r1"
    assert adapter.path.is_relative_to(tmp_path / "cache")
    with pytest.raises(BatchError, match="unknown adapter 'nope'"):
        resolve_adapter(config, "store:nope", str(model))


def test_the_manifest_names_the_grammar_by_its_hash(viggo_task):
    from types import SimpleNamespace

    from e2e_llm.batch.run import _regex_id

    assert _regex_id(viggo_task) == _regex_id(viggo_task)
    assert _regex_id(viggo_task) != _regex_id(SimpleNamespace(output_regex=lambda: "inform\\(.*\\)"))


def test_one_dataset_block_per_engine_batch():
    from e2e_llm.batch.pipeline import num_blocks

    assert [num_blocks(n, 32) for n in (1, 32, 33, 200, 714)] == [1, 1, 2, 7, 23]


@pytest.mark.parametrize("ref", ["nope", "latest"])
def test_an_adapter_that_is_not_there_is_named_once(config, tmp_path, ref):
    from e2e_llm.batch import resolve_adapter
    from e2e_llm.runs import AdapterNotFound
    from e2e_llm.runs import resolve_adapter as resolve_run_adapter
    from e2e_llm.store import StoreError, find_training_adapter

    model = str(fake_model(tmp_path / "models"))
    for call, error in ((lambda: resolve_adapter(config, ref, model), BatchError),
                        (lambda: resolve_run_adapter(config, ref), AdapterNotFound),
                        (lambda: find_training_adapter(config, ref), StoreError)):
        with pytest.raises(error) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"adapter {ref!r}: ") and message.count(repr(ref)) == (2 if ref == "nope" else 1), \
            message


def test_publish_names_a_wrong_adapter_before_it_needs_the_store(project_root, monkeypatch, capsys, tmp_path):
    from e2e_llm.cli import main
    from e2e_llm.store import AdapterStore, StoreError

    def store_down(self):
        raise StoreError("the store is down")

    monkeypatch.chdir(project_root)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path))
    monkeypatch.setattr(AdapterStore, "require_reachable", store_down)
    assert main(["publish", "--profile", "local", "--adapter", str(tmp_path / "gone")]) == 1
    assert f"adapter {str(tmp_path / 'gone')!r}" in capsys.readouterr().err
    assert main(["publish", "--profile", "local", "--list"]) == 1
    assert "the store is down" in capsys.readouterr().err



def test_rows_asking_otherwise_than_the_adapter_learned_are_named(tmp_path):
    """An adapter trained on rows asking with one instruction scores ~0.16 lower exact match when
    asked with another (VIGGO val): batch says so before the engine starts."""
    from e2e_llm.batch import Adapter
    from e2e_llm.batch.adapter import instruction_mismatch

    trained = Adapter(path=tmp_path / "adapter", sha256="x", rank=8, base_model=None,
                      manifest={"run_id": "r1", "dataset": {"instruction": "Long VIGGO instruction."}})
    short = [{"instruction": "Write the meaning representation.", "input": "a"}] * 3
    message = instruction_mismatch(trained, short, "Default.", "/d/val.jsonl")
    assert message == (f"adapter {tmp_path / 'adapter'} was trained on rows asking with the instruction "
                       "'Long VIGGO instruction.' (training run r1), and every row of /d/val.jsonl asks with "
                       "'Write the meaning representation.': an adapter asked otherwise than it learned answers "
                       "worse, so these scores would not be its own. Score it on rows written with its "
                       "instruction (`e2e-llm data` under a profile whose data.system_prompt is it, or null for "
                       "the source's own)")
    same = [{"instruction": "Long VIGGO instruction.", "input": "a"}]
    assert instruction_mismatch(trained, same, "Default.", "v") is None
    # a row without an instruction asks with the task's default
    assert instruction_mismatch(trained, [{"input": "a"}], "Long VIGGO instruction.", "v") is None
    assert "asks with 'Default.'" in instruction_mismatch(trained, [{"input": "a"}], "Default.", "v")
    assert instruction_mismatch(trained, [*short, *same], "Default.", "v") is None  # rows ask with several
    assert instruction_mismatch(trained, [], "Default.", "v") is None
    older = Adapter(path=tmp_path, sha256="x", rank=8, base_model=None, manifest={"run_id": "r0"})
    assert instruction_mismatch(older, short, "Default.", "v") is None  # a manifest from before it was recorded
    assert instruction_mismatch(None, short, "Default.", "v") is None
    long = Adapter(path=tmp_path, sha256="x", rank=8, base_model=None, manifest={"dataset": {"instruction": "y" * 200}})
    assert f"instruction '{'y' * 69}…'," in instruction_mismatch(long, short, "Default.", "v")


def test_batch_refuses_rows_asking_otherwise_than_the_adapter_learned_unless_told(
        project_root, monkeypatch, capsys, tmp_path, local_model):
    """The CLI: refused with exit 1 before any engine starts; --any-instruction scores anyway and
    the batch manifest says why the scores are not the adapter's own."""
    import e2e_llm.batch.run
    from e2e_llm.cli import main

    run = tmp_path / "runs" / "r1"
    adapter = fake_adapter(run, base=str(local_model))
    (run / "manifest.json").write_text(json.dumps({"run_id": "r1", "dataset": {"instruction": "Long instruction."}}))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": "Short.", "input": f"s{i}", "output": "inform(name[X])"}) + "\n"
                            for i in range(3)))
    generated = []

    def fake_generate(config, engine_rows, **kwargs):
        generated.append(len(engine_rows))
        return [{**r, "generated_text": r["output"], "num_input_tokens": 1, "num_generated_tokens": 1,
                 "truncated": False, "error": None} for r in engine_rows]

    monkeypatch.setattr(e2e_llm.batch.run, "generate", fake_generate)
    monkeypatch.setenv("E2E_LLM_STORAGE_ROOT", str(tmp_path / "storage"))
    args = ["batch", "--profile", "local", "--adapter", str(adapter), "--split", str(rows), "--mode", "lora"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "trained on rows asking with the instruction 'Long instruction.' (training run r1)" in err
    assert err.rstrip().endswith("or pass --any-instruction to score it anyway") and generated == []

    assert main([*args, "--any-instruction", "--output", str(tmp_path / "out")]) == 0
    assert generated == [3]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["instruction_mismatch"].startswith(f"adapter {adapter} was trained on rows asking with")
    assert "[batch] warning: adapter" in capsys.readouterr().out
