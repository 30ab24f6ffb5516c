# SPDX-License-Identifier: Apache-2.0
"""`make e2e`'s terminal filter: known noise stays in the stage log only, errors always show."""

import sys

import pytest

from e2e_llm.e2e import run_stage
from e2e_llm.logs import EXAMPLE_MAX_LINES, TERMINAL_NOISE, TerminalFilter

C, R = "\x1b[36m", "\x1b[0m"  # Ray's colour codes around a worker prefix
REPLICA = f"{C}(ServeReplica:llm:E2ELLMServer:smollm2-135m pid=11276){R} "

# One real line per known-noise entry (from the serve, batch and train logs of a local run).
SAMPLES = {
    "ray-serve-info": [
        "INFO 2026-12-02 03:28:11,009 serve 10912 -- Started Serve in namespace \"serve\".",
        f"{C}(ServeController pid=11150){R} INFO 2026-12-02 03:28:19,161 controller 11150 -- Adding 1 replica to "
        "Deployment(name='E2EIngress', app='llm').",
        f"{C}(ServeReplica:llm:E2EIngress pid=11277){R} INFO 2026-12-02 03:29:26,413 llm_E2EIngress huqyf945 "
        "bfd438a8-4734-45db-92a4-c80b175a7538 -- POST /v1/chat/completions 200 8641.3ms",
    ],
    "ray-serve-json-info": [
        f'{C}(ServeReplica:llm:E2EIngress pid=11277){R} {{"asctime": "2026-12-02 03:29:17,793", "levelname": "INFO", '
        '"message": "Found credentials in environment variables."}',
    ],
    "vllm-info": [
        f"{REPLICA}INFO 12-02 03:28:40 [model.py:2021] Using max model len 1024",
        f"{REPLICA}(EngineCore pid=11462) INFO 12-02 03:28:52 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]",
        f"{C}(MapWorker(MapBatches(vLLMEngineStageUDF)) pid=8248){R} INFO 12-02 04:21:10 [scheduler.py:277] Chunked "
        "prefill is enabled with max_num_batched_tokens=4096.",
    ],
    "vllm-known-warnings": [
        f"{REPLICA}WARNING 12-02 03:28:40 [vllm.py:1371] Enforce eager set, disabling torch.compile and CUDAGraphs.",
        f"{REPLICA}(Worker pid=11501) WARNING 12-02 03:29:03 [cpu_worker.py:127] libtcmalloc is not found in "
        "LD_PRELOAD. For best performance, please follow the section `set LD_PRELOAD` in the docs.",
    ],
    "torch-numa-warning": [
        f"{REPLICA}[W1202 03:29:03.637288119 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory "
        "allocation on the NUMA nodes (0).",
    ],
    "progress-bars": [
        f"{REPLICA}(Worker pid=11501)",
        "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00,  4.02it/s]",
    ],
    "ray-llm-no-mirror": [f"{C}(initialize_remote_node pid=11382){R} No cloud storage mirror configured"],
    "ray-token-auth": [
        "2026-12-02 03:28:02,015\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
        "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    ],
    "ray-init-again": [
        "2026-12-02 04:20:55,506\tINFO worker.py:1855 -- Calling ray.init() again after it has already been called.",
    ],
    "hf-trainer-log-dict": [
        f"{C}(RayTrainWorker pid=8024){R} {{'loss': '1.309', 'grad_norm': '1.287', 'learning_rate': '0.002922', "
        "'epoch': '0.125', 'num_input_tokens_seen': 7530}",
    ],
    "train-known-warnings": [
        f"{C}(RayTrainWorker pid=8024){R} [WARNING|2026-12-02 04:53:46] llamafactory.extras.misc:155 >> Version "
        "checking has been disabled, may lead to unexpected behaviors.",
        f"{C}(RayTrainWorker pid=8024){R} [WARNING|2026-12-02 04:53:47] llamafactory.hparams.parser:149 >> We "
        "recommend enable mixed precision training.",
        f"{C}(RayTrainWorker pid=8024){R} [transformers] `torch_dtype` is deprecated! Use `dtype` instead!",
        f"{C}(RayTrainWorker pid=8024){R} [transformers] The tokenizer has new PAD/BOS/EOS tokens that differ from "
        "the model config and generation config.",
        f"{C}(RayTrainWorker pid=8024){R} /venv/lib/python3.11/site-packages/torch/utils/data/dataloader.py:759: "
        "UserWarning: 'pin_memory' argument is set as true but no accelerator is found",
        f"{C}(RayTrainWorker pid=8024){R}   super().__init__(loader)",
        f"{C}(RayTrainWorker pid=8024){R} [WARNING|2026-12-02 05:03:01] llamafactory.extras.ploting:149 >> No metric "
        "eval_loss to plot.",
    ],
    "hf-trainer-metrics": [
        f"{C}(RayTrainWorker pid=8024){R} ***** train metrics *****",
        f"{C}(RayTrainWorker pid=8024){R}   epoch                    =        1.0",
        f"{C}(RayTrainWorker pid=8024){R}   train_loss               =     0.4747",
    ],
    "peft-merge-warning": [
        "/venv/lib/python3.11/site-packages/transformers/modeling_utils.py:3312: FutureWarning: "
        "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
        "  warnings.warn(",
    ],
    "ray-train-reports": [
        f"{C}(RayTrainWorker pid=27020){R} Checkpoint successfully created at: Checkpoint(filesystem=local, "
        "path=/x/.e2e/local/runs/20261204-234707/checkpoint_2026-12-04_23-50-03.334110)",
        f"{C}(RayTrainWorker pid=27020){R} Reporting training result 1: TrainingReport(checkpoint=Checkpoint("
        "filesystem=local, path=/x/checkpoint_2026-12-04_23-50-03.334110), metrics={'global_step': 64, 'loss': 0.398})",
        f"{C}(RayTrainWorker pid=27011){R} Reporting training result 1: TrainingReport(checkpoint=None, metrics="
        "{'global_step': 64, 'epoch': 0.2222222222222222, 'loss': 0.3983010947704315}, validation=False) from rank 1",
    ],
    "ray-actor-constructor-args": [
        f"{C}(TrainController pid=26878){R} [2026-12-04 23:48:18,866 E 26878 26908] core_worker.cc:2465: Actor with "
        "class name: 'PreemptionWatcher' and ID: '5c7527d384d9e92f72376c7701000000' has constructor arguments in "
        "the object store and max_restarts > 0. If the arguments are spilled to disk or the node is lost, the "
        "actor cannot be restarted.",
        "[2026-12-04 23:55:14,221 E 28833 28833] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches("
        "ChatTemplateUDF))' and ID: '8dc6b7861feb5306a55cf31801000000' has constructor arguments in the object "
        "store and max_restarts > 0.",
    ],
    "ray-serve-shutdown": [
        "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries remaining, "
        "so the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.",
    ],
    "vllm-lora-tokenizer": [
        f"{REPLICA}WARNING 12-04 23:59:01 [input_processor.py:196] vLLM has deprecated support for supporting "
        "different tokenizers for different LoRAs. By default, vLLM uses base model's tokenizer.",
    ],
    "ray-data-no-progress": [
        "2026-12-02 04:20:57,119\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
        "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    ],
}

# Lines of the same shapes that must still reach the terminal.
SHOWN = [
    f"{REPLICA}ERROR 12-02 04:21:35 [multiproc_executor.py:944] ValueError: Available memory on node 0 is less "
    "than desired CPU memory utilization",
    f"{C}(ServeController pid=11150){R} WARNING 2026-12-02 03:28:49,210 controller 11150 -- Deployment "
    "'E2ELLMServer:smollm2-135m' in application 'llm' has 1 replicas that have taken more than 30s to initialize.",
    f"{C}(ServeController pid=11150){R} ERROR 2026-12-02 03:28:49,210 controller 11150 -- Exception in replica",
    f"{REPLICA}WARNING 12-02 03:29:18 [input_processor.py:196] something vLLM has not said before",
    "2026-12-02 04:20:48,944\tINFO worker.py:2038 -- Started a local Ray instance.",
    "serving smollm2-135m at http://127.0.0.1:8000/v1 (model=\"smollm2-135m:viggo\"); Ctrl-C to stop",
    "[train] step 8/28 loss 1.234",
    f"{C}(RayTrainWorker pid=8024){R} [WARNING|2026-12-02 04:53:47] llamafactory.data.loader:149 >> a new warning",
    "{'train_runtime': '412.1', 'train_samples_per_second': 0.6}",
    "",  # a stage's own blank line (no Ray prefix)
    "INFO 2026-12-02 03:28:11,009 serve 10912 -- RuntimeError: the app failed to deploy",  # names an error
    # other core_worker lines and other failed tasks of the raylet still show
    "[2026-12-04 23:55:14,221 E 28833 28833] core_worker.cc:901: The object store is full",
    "\x1b[33m(raylet)\x1b[0m Task E2EIngress.__call__ failed. There are infinite retries remaining.",
]


def test_every_known_noise_entry_has_a_reason_and_a_sample():
    names = [n.name for n in TERMINAL_NOISE]
    assert len(set(names)) == len(names) and set(names) == set(SAMPLES)
    assert all(len(n.why) > 10 for n in TERMINAL_NOISE)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_known_noise_is_kept_off_the_terminal_and_counted(name):
    terminal = TerminalFilter()
    for line in SAMPLES[name]:
        assert not terminal.show(line), line
    assert terminal.hidden == {name: len(SAMPLES[name])}


@pytest.mark.parametrize("line", SHOWN)
def test_errors_warnings_and_the_story_still_show(line):
    assert TerminalFilter().show(line)


def test_a_hidden_records_indented_lines_go_with_it_but_a_traceback_after_it_shows():
    terminal = TerminalFilter()
    lines = [
        "INFO 2026-12-02 03:28:18,527 serve 10912 -- {'autoscaling_config': {'max_replicas': 1,",
        "                        'min_replicas': 1},",
        " 'name': 'E2ELLMServer:smollm2-135m'}",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "RuntimeError: boom",
    ]
    assert [terminal.show(line) for line in lines] == [False, False, False, True, True, True]


def test_llamafactory_example_dump_is_hidden_up_to_the_decoded_labels():
    prefix = f"{C}(RayTrainWorker pid=9001){R} "
    block = ["training example:", "input_ids:", "[1, 9690, 198]", "inputs:", "<|im_start|>system",
             "You are a helpful assistant.<|im_end|>", "label_ids:", "[-100, -100, 34]", "labels:",
             "inform(name[Tomb Raider], rating[good])<|im_end|>"]
    terminal = TerminalFilter()
    assert not any(terminal.show(prefix + line) for line in block)
    assert terminal.show(prefix + "[train] step 4/28 loss 2.1")
    assert terminal.hidden == {"example": len(block)}


def test_an_example_block_that_never_ends_is_shown_after_the_cap():
    terminal = TerminalFilter()
    shown = [terminal.show(line) for line in ["training example:", *(["x"] * (EXAMPLE_MAX_LINES + 5))]]
    assert shown.count(False) == EXAMPLE_MAX_LINES and all(shown[EXAMPLE_MAX_LINES:])


def test_an_error_inside_an_example_block_shows_and_ends_it():
    terminal = TerminalFilter()
    assert not terminal.show("training example:")
    assert terminal.show("ValueError: bad template")
    assert terminal.show("[train] step 1/28")


def test_run_stage_keeps_noise_in_the_log_only(tmp_path):
    shown = []
    noise = SAMPLES["vllm-info"][0]
    code = f"print({noise!r}); print('story'); print({SHOWN[0]!r})"
    result = run_stage("x", [sys.executable, "-c", code], tmp_path / "x.log", env={}, echo=shown.append)
    assert shown == ["story", SHOWN[0]] and result.hidden == 1
    assert (tmp_path / "x.log").read_text().splitlines()[1:] == [noise, "story", SHOWN[0]]
