# SPDX-License-Identifier: Apache-2.0
"""The ``e2e-llm`` command line: one subcommand per stage, each a thin layer over the library.

Usage:
    e2e-llm data   --profile local          # fetch + validate + write clean splits
    e2e-llm model  --profile local          # prepare the local base model
    e2e-llm <stage> --help

Each stage module exposes ``add_arguments(parser)`` and ``run(args) -> int``; heavy
dependencies (Ray, vLLM, LLaMA-Factory) are imported inside ``run``, so ``--help`` works in
either environment.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback

from e2e_llm.config import ConfigError

# Exit status of a subcommand that cannot start: its profile or another config file is invalid, or
# this environment lacks what it needs.
CONFIG_ERROR = 2
# A shell's status for a program ended by Ctrl-C (128 + SIGINT): `e2e-llm train && ...` stops there.
INTERRUPTED = 130
# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("e2e_llm.commands.data", "fetch, validate and write the task's dataset splits"),
    "model": ("e2e_llm.commands.model", "prepare the profile's base model (local GGUF -> safetensors)"),
    "train": ("e2e_llm.commands.train", "LoRA SFT with LLaMA-Factory on Ray Train"),
    "evaluate": ("e2e_llm.commands.evaluate", "score a results file: exact match, slot F1, report and chart"),
    "batch": ("e2e_llm.commands.batch", "batch inference with ray.data.llm (vLLM) over a split, then evaluate"),
    "render": ("e2e_llm.commands.render", "render Anyscale YAMLs and KubeRay manifests from configs/ (--check: drift)"),
    "validate": ("e2e_llm.commands.validate", "offline validation ladder for every rendered and hand-written manifest"),
    "preflight": ("e2e_llm.commands.preflight", "check credentials and cluster access for a deploy target"),
    "wait-service": ("e2e_llm.commands.wait_service", "wait for a service rollout's real end (or fail with why)"),
    "wait-job": ("e2e_llm.commands.wait_job", "wait for a RayJob to succeed (or fail at once with KubeRay's reason)"),
    "image": ("e2e_llm.commands.image", "build a container image with whichever engine answers (docker/podman)"),
    "publish": ("e2e_llm.commands.publish", "publish a trained adapter to the adapter store, set an alias"),
    "store": ("e2e_llm.commands.store", "run a profile's local adapter store (S3 on loopback) in the foreground"),
    "serve": ("e2e_llm.commands.serve", "run the OpenAI-compatible Ray Serve LLM app (multi-LoRA, auth, aliases)"),
    "canary": ("e2e_llm.commands.canary", "roll an adapter version out behind an alias, gated on quality and SLOs"),
    "promote": ("e2e_llm.commands.promote", "promote the unfinished canary's candidate to stable now"),
    "rollback": ("e2e_llm.commands.rollback", "adapter rollback: abort the canary or revert the last promotion"),
    "e2e": ("e2e_llm.commands.e2e", "the whole local pipeline with banners, full logs in files and a summary"),
    "canary-set": ("e2e_llm.commands.canary_set", "make the versioned canary set from held-out rows"),
}

# Subcommands that need a library only one of the two pinned environments has (README,
# "Environments"): subcommand -> (module, library, environment).
NEEDS_ENVIRONMENT: dict[str, tuple[str, str, str]] = {
    "train": ("llamafactory", "LLaMA-Factory", "train"),
    "batch": ("vllm", "vLLM", "serve"),
    "serve": ("vllm", "vLLM", "serve"),
    "store": ("moto", "moto", "serve"),
}


def memory_settings(command: str) -> str | None:
    """What most of ``command``'s memory is and the profile settings that lower it, for the line
    that says the out-of-memory killer struck (:meth:`e2e_llm.memory.OomWatch.note`); None for the
    commands that start no training or engine here."""
    from e2e_llm.memory import GIB
    from e2e_llm.serve import CPU_KV_CACHE_BYTES

    kv_cache = (f"{CPU_KV_CACHE_BYTES / GIB:g} GiB on CPU unless set; a CPU engine also holds the model in "
                f"its dtype")
    return {
        "train": "each of train.num_workers holds the model, its LoRA optimizer state and a batch's activations: "
                 "fewer workers, or the recipe's per_device_train_batch_size or cutoff_len",
        "batch": f"the engine's KV cache, kv_cache_memory_bytes in batch.engine_kwargs ({kv_cache})",
        "serve": f"each replica's KV cache, kv_cache_memory_bytes in serve.engine_kwargs ({kv_cache})",
        "model": "the conversion holds the model in memory twice (GGUF and safetensors)",
    }.get(command)


def wrong_environment(command: str) -> str | None:
    """Why ``command`` cannot run in this Python, or None. Without the check the run fails late:
    ``batch`` after Ray started, in an engine actor; ``train`` in a traceback about imports."""
    if command not in NEEDS_ENVIRONMENT:
        return None
    module, library, environment = NEEDS_ENVIRONMENT[command]
    if importlib.util.find_spec(module) is not None:
        return None
    return (f"e2e-llm {command} needs {library}, which this Python ({sys.executable}) does not have: run it "
            f"from the {environment} environment (.venv/{environment}/bin/e2e-llm, made by `make env`; "
            f"the {environment} image in a cluster)")


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="local", help="profile name under configs/profiles or a path")


def ray_temp_dir(value: str) -> str:
    """argparse type of ``--ray-temp-dir``: refused at once where Ray's sockets would not fit."""
    from e2e_llm.node_temp import ray_temp_dir_problem

    if problem := ray_temp_dir_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2e-llm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := wrong_environment(args.command):
        print(f"error: {problem}", file=sys.stderr)
        return CONFIG_ERROR
    from e2e_llm.memory import OomWatch
    from e2e_llm.proxy_env import bypass_proxy_for_this_machine

    bypass_proxy_for_this_machine()  # before anything starts a server here or a process that talks to one
    lower = memory_settings(args.command)
    watch = OomWatch.start() if lower else OomWatch(None)  # no kill count: no note

    def oom_note() -> str | None:
        return watch.note(f"e2e-llm {args.command}", lower)

    try:
        code = int(args._run(args) or 0)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except Exception:
        # A process killed for lack of memory fails the command with words that never say so
        # (vLLM: "Engine core initialization failed. See root cause above"): the note comes last.
        if note := oom_note():
            traceback.print_exc()
            print(note, file=sys.stderr)
            return 1
        raise
    if code not in (0, INTERRUPTED) and (note := oom_note()):
        print(note, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
