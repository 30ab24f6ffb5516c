# SPDX-License-Identifier: Apache-2.0
"""Known noise in `make e2e`: log records dropped in Ray's worker processes, and lines of a
stage's output kept out of the terminal (they still go to the stage's log file).

:data:`KNOWN_NOISE` is installed with Ray's public
``runtime_env={"worker_process_setup_hook": ...}`` (see :func:`e2e_llm.train_worker.setup_process`), so it
runs in every worker and actor of the job before they log. :class:`TerminalFilter` is what
``e2e-llm e2e`` echoes a stage's lines through. Each entry says why its records are noise;
anything not listed, and any line that names an error, still reaches the terminal.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

# logger name -> message prefixes dropped (each with the reason it is noise)
KNOWN_NOISE: dict[str, tuple[str, ...]] = {
    # Ray Train v2's PlacementGroupCleaner polls the controller through the State API; on a busy
    # 2-core machine the poll times out and it logs this warning, then simply polls again
    # (ray/train/v2/_internal/execution/controller/placement_group_cleaner.py). One run printed
    # it 519 times; the training itself is unaffected.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Failed to query Ray Train Controller actor state",
    ),
}


class DropKnownNoise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Ray worker setup hook: attach the filters (idempotent)."""
    for name, prefixes in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnownNoise) for f in logger.filters):
            logger.addFilter(DropKnownNoise(prefixes))


# --- the terminal of `make e2e` ----------------------------------------------------------------
# `e2e-llm e2e` writes every line of a stage to its log file and echoes it to the terminal unless
# it is one of these known-noise records (matched after the colour codes and Ray's
# "(Actor pid=N)" prefixes are taken off). Each pattern says why its lines are noise; a line
# that names an error is always shown (ERROR_LINE), whatever it matches.
@dataclass(frozen=True)
class Noise:
    name: str
    pattern: re.Pattern[str]
    why: str


TERMINAL_NOISE: tuple[Noise, ...] = (
    Noise("ray-serve-info", re.compile(r"^INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \S+(?: \S+){1,3} -- "),
          # Ray Serve's own formatter (level, time, component, ids): the controller, the proxy,
          # each replica and the driver report every deploy step, route table, autoscaling
          # registration and request at INFO, ~50 lines per `serve run` on a 2-core box, plus
          # ray.llm's pprint of the deployment options. `e2e-llm serve` prints one line when the
          # app is ready and the client prints its answer; Serve's WARNINGs still show.
          "Ray Serve INFO records (deploy steps, routes, deployment options, request log)"),
    Noise("ray-serve-json-info", re.compile(r'^\{"asctime": "[^"]*", "levelname": "INFO"'),
          # The same, from replicas that log in Ray Serve's JSON encoding (boto3's "Found
          # credentials in environment variables" when the ingress opens the adapter store).
          "Ray Serve INFO records in JSON encoding"),
    Noise("vllm-info", re.compile(r"^INFO \d\d-\d\d \d\d:\d\d:\d\d \[[\w./-]+:\d+\] "),
          # vLLM's formatter: at INFO every engine start prints its whole config, OpenMP thread
          # binding, KV cache size, weight loading and warm-up, ~40 lines per engine.
          "vLLM INFO records (engine config and start-up)"),
    Noise("vllm-known-warnings",
          re.compile(r"^WARNING \d\d-\d\d \d\d:\d\d:\d\d \[[\w./-]+:\d+\] (Enforce eager set|Inductor compilation "
                     r"was disabled|Model Runner V2 requires Triton|Reset SSM cache type|lib(tcmalloc|iomp) is not "
                     r"found in LD_PRELOAD)"),
          # Consequences of settings the local profile makes on purpose (engine_kwargs.enforce_eager:
          # the engine starts in ~15 s instead of 60-100 s) or of the CPU wheel (no Triton, no
          # Mamba layers in a Llama model, no tcmalloc/iomp preloaded: the README's timings are
          # without them): nothing a user of `make e2e` can or should act on.
          "vLLM warnings that restate the profile's enforce_eager or the CPU wheel"),
    Noise("torch-numa-warning", re.compile(r"^\[W\d{4} [\d:.]+ utils\.cpp:\d+\] Warning: NUMA binding"),
          # torch's note that vLLM's CPU worker binds its memory to NUMA node 0 (the only one).
          "torch: vLLM binds memory to the NUMA node it runs on"),
    Noise("progress-bars", re.compile(r"^Loading safetensors checkpoint shards:"),
          # vLLM's weight-loading bar (not reached by TQDM_DISABLE): each redraw is a line here.
          "vLLM's weight-loading progress bar"),
    Noise("ray-llm-no-mirror", re.compile(r"^No cloud storage mirror configured$"),
          # ray.llm's model download step prints it for every local model folder (always, locally).
          "ray.llm: model read from a local folder"),
    Noise("ray-token-auth", re.compile(r"^\S+ \S+\s+WARNING authentication_token_setup\.py:\d+ -- Token authentication "
                                       r"is enabled"),
          # Ray 2.60 says so at every start of a local instance (train, batch, serve: 3-4 times a
          # run); `make e2e`'s instances are private to the run and stopped with it.
          "Ray: token authentication is on (every local start)"),
    Noise("ray-init-again", re.compile(r"^\S+ \S+\s+INFO worker\.py:\d+ -- Calling ray\.init\(\) again"),
          # ray.data.llm calls ray.init() itself after `e2e-llm batch` started Ray.
          "Ray: ray.data.llm's second ray.init()"),
    Noise("hf-trainer-log-dict", re.compile(r"^\{'loss': "),
          # The HF Trainer prints each logging step's dict; `e2e-llm train` prints the same step as
          # one `[train] step N/M loss ... tok/s ... eta` line (and keeps all of it in the run's
          # log.jsonl).
          "HF Trainer's per-step log dict (the [train] step line says the same)"),
    Noise("train-known-warnings",
          re.compile(r"^(\[WARNING\|[^]]*\] llamafactory\.(extras\.misc:\d+ >> Version checking has been disabled"
                     r"|hparams\.parser:\d+ >> We recommend enable mixed precision"
                     r"|extras\.ploting:\d+ >> No metric eval_\w+ to plot)"
                     r"|\[transformers\] (`torch_dtype` is deprecated|The tokenizer has new PAD/BOS/EOS tokens)"
                     r"|\S+/torch/utils/data/dataloader\.py:\d+: UserWarning: 'pin_memory' argument is set as true "
                     r"but no accelerator)"),
          # Restating choices `e2e-llm train` makes on purpose: LLaMA-Factory's version check is off
          # (the environments are pinned), float32 where the CPU has no fast bf16 (the dtype line
          # says why), no eval loss to plot (the recipe's do_eval: false), LLaMA-Factory's own
          # torch_dtype argument and SmolLM2's tokenizer special
          # tokens (transformers aligns the config, as it should), and pin_memory on a CPU-only
          # machine (a no-op). The indented source line of the UserWarning goes with it.
          "LLaMA-Factory/transformers/torch warnings about settings made on purpose"),
    Noise("hf-trainer-metrics", re.compile(r"^\*{5} (train|eval) metrics \*{5}$"),
          # The HF Trainer's closing table (runtime, loss, samples/s; its indented rows go with it):
          # `e2e-llm train` prints the same figures as its run summary right after.
          "HF Trainer's closing metrics table (the run summary says the same)"),
    Noise("peft-merge-warning",
          re.compile(r"^\S+/transformers/modeling_utils\.py:\d+: FutureWarning: `is_gradient_checkpointing` is "
                     r"deprecated"),
          # peft's merge_and_unload (the batch stage's merged mode) still calls the old name; its
          # indented `warnings.warn(` line goes with it.
          "transformers deprecation hit by peft's merge"),
    Noise("ray-train-reports", re.compile(r"^(Checkpoint successfully created at: Checkpoint\(|Reporting training "
                                          r"result \d+: TrainingReport\()"),
          # Ray Train logs each checkpoint and each worker's report of it (~600 characters each, 3
          # lines per checkpoint): the [train] step lines and the run summary carry the same
          # figures, and the checkpoints are in the run folder the summary names.
          "Ray Train: each checkpoint and worker report (the [train] lines say the same)"),
    Noise("ray-actor-constructor-args",
          re.compile(r"^\[[\d-]+ [\d:,]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: '[^']+' and ID: "
                     r"'\w+' has constructor arguments in the object store and max_restarts > 0"),
          # Ray's note about actors that Ray Train (PreemptionWatcher) and Ray Data (map workers)
          # create with restarts on: a restart keeps their arguments in the object store. Not an
          # error, and nothing in this package creates them.
          "Ray: its own restartable actors keep their constructor arguments"),
    Noise("ray-serve-shutdown", re.compile(r"^(\(raylet\) )?Task ServeController\.graceful_shutdown failed\. There are "
                                           r"infinite retries remaining"),
          # serve.shutdown() kills Serve's controller once its graceful shutdown is done; the raylet
          # then reports the killed actor's pending task. Printed after "shutting down Serve".
          "Ray Serve: the controller killed by serve.shutdown()"),
    Noise("vllm-lora-tokenizer",
          re.compile(r"^WARNING \d\d-\d\d \d\d:\d\d:\d\d \[input_processor\.py:\d+\] vLLM has deprecated support "
                     r"for supporting different tokenizers for different LoRAs"),
          # LLaMA-Factory saves the base model's tokenizer beside the adapter, unchanged by LoRA
          # training (tests/integration/test_train.py compares them), and vLLM uses the base
          # model's: the same one.
          "vLLM: an adapter folder holds a tokenizer (the base model's)"),
    Noise("ray-data-no-progress", re.compile(r"^\S+ \S+\s+WARNING __init__\.py:\d+ -- Progress bars disabled\."),
          # The answer to QUIET_ENV's RAY_DATA_DISABLE_PROGRESS_BARS, which `make e2e` sets itself.
          "Ray Data: progress bars are off (make e2e turns them off)"),
)
# A known-noise record may continue on indented lines (a pprint dump); they go with it.
CONTINUATION = re.compile(r"^\s")
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)|\w+(Error|Exception):")
# Ray's driver prefix for a worker's line, e.g. "(ServeReplica:llm:X pid=11276, ip=10.0.0.1) " or
# "(MapWorker(Map(f)->MapBatches(G)) pid=8247) ", and vLLM's own prefix for its engine process,
# "(EngineCore pid=11462) "; ANSI colour codes.
PREFIX = re.compile(r"^(?:\(.*? pid=\d+(?:, ip=[\d.]+)?\)(?: |$))+")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# LLaMA-Factory prints one tokenised training example (ids, decoded prompt, label ids, labels:
# ~30 lines with the whole system prompt) with print(), which no verbosity setting reaches:
# a check for people writing templates, not for a run of a known recipe. The block runs from
# "training example:" (or "eval example:") to the line after "labels:"; at most EXAMPLE_MAX_LINES.
EXAMPLE_START = re.compile(r"^(training|eval) example:$")
EXAMPLE_LAST_HEADER = re.compile(r"^labels:$")
EXAMPLE_MAX_LINES = 200


def _bare(line: str) -> str:
    return PREFIX.sub("", ANSI.sub("", line)).rstrip("\n")


class TerminalFilter:
    """Decides, line by line, whether a stage's output line reaches the terminal (the log file
    gets every line). Counts what it hid, by :class:`Noise` name (``example`` for the
    LLaMA-Factory dump), so the stage's closing line can say so."""

    def __init__(self) -> None:
        self.hidden: dict[str, int] = {}
        self._continuing: str | None = None  # name of the hidden record indented lines belong to
        self._example = 0  # lines into a LLaMA-Factory example block (0: not in one)
        self._example_ending = False

    def show(self, line: str) -> bool:
        bare = _bare(line)
        if not bare.strip() and line.strip():  # a Ray prefix alone: a progress bar redrawn with \r
            return self._hide("progress-bars")
        if ERROR_LINE.search(bare):
            self._continuing, self._example, self._example_ending = None, 0, False
            return True
        if self._example:
            return self._in_example(bare)
        if EXAMPLE_START.match(bare):
            self._example = 1
            return self._hide("example")
        if self._continuing and bare and CONTINUATION.match(bare):
            return self._hide(self._continuing)
        self._continuing = None
        for noise in TERMINAL_NOISE:
            if noise.pattern.match(bare):
                self._continuing = noise.name
                return self._hide(noise.name)
        return True

    def _in_example(self, bare: str) -> bool:
        self._example += 1
        if self._example > EXAMPLE_MAX_LINES:  # not the block we know: show the rest
            self._example, self._example_ending = 0, False
            return True
        if self._example_ending:  # the decoded labels: the block's last line
            self._example, self._example_ending = 0, False
        elif EXAMPLE_LAST_HEADER.match(bare):
            self._example_ending = True
        return self._hide("example")

    def _hide(self, name: str) -> bool:
        self.hidden[name] = self.hidden.get(name, 0) + 1
        return False

    @property
    def hidden_total(self) -> int:
        return sum(self.hidden.values())
