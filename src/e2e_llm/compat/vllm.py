# SPDX-License-Identifier: Apache-2.0
"""vLLM (0.29) beyond its public API: the CPU backend's multi-LoRA ops.

``PunicaWrapperCPU`` (``vllm.lora.punica_wrapper.punica_cpu``) calls six module-level functions
for every LoRA layer; :func:`use_grouped_cpu_lora_ops` rebinds them there to
:mod:`e2e_llm.cpu_lora_ops` (why: that module's docstring). It runs through vLLM's public plugin
hook: :func:`register` is this package's ``vllm.general_plugins`` entry point (pyproject.toml),
which vLLM calls in every process it starts, its model workers included, so the engines of
``ray.data.llm``, ``ray.serve.llm`` and plain ``vllm`` get it alike. On other platforms it does
nothing. ``VLLM_PLUGINS`` (vLLM's list of plugins to load) set without ``e2e_llm_cpu_lora`` turns
it off, e.g. to measure vLLM's own ops. After a vLLM upgrade run
``pytest tests/unit/test_compat_vllm.py``: it names each entry that moved or changed.
"""

from __future__ import annotations

from e2e_llm.compat import CompatError, Entry, problems, resolve

PUNICA_CPU = "vllm.lora.punica_wrapper.punica_cpu"
PLUGIN_NAME = "e2e_llm_cpu_lora"  # the entry point's name in pyproject.toml (what VLLM_PLUGINS lists)

_WHY = ("vLLM's CPU LoRA op applies the last slot's adapter to tokens without one (vllm-project/vllm#48421) "
        "and copies a weight matrix per token; PunicaWrapperCPU calls this module-level name, which "
        "e2e_llm.cpu_lora_ops replaces")
_SGMV = ("inputs", "lora_{}_weights", "output_tensor", "b_seq_start_loc", "seq_len_tensor", "lora_indices_tensor",
         "batches", "max_seq_length", "token_nums")
CPU_LORA_OPS = [
    Entry(PUNICA_CPU, "sgmv_shrink", why=_WHY, upstream="vllm-project/vllm#48421",
          params=(*(p.format("a") for p in _SGMV), "scaling")),
    Entry(PUNICA_CPU, "sgmv_expand", why=_WHY, upstream="vllm-project/vllm#48421",
          params=(*(p.format("b") for p in _SGMV), "add_inputs")),
    Entry(PUNICA_CPU, "sgmv_expand_slice", why=_WHY, upstream="vllm-project/vllm#48421",
          params=(*(p.format("b") for p in _SGMV), "slice_offset", "slice_size", "add_inputs")),
    Entry(PUNICA_CPU, "bgmv_shrink", why=_WHY, upstream="vllm-project/vllm#48421",
          params=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling")),
    Entry(PUNICA_CPU, "bgmv_expand", why=_WHY, upstream="vllm-project/vllm#48421",
          params=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs")),
    Entry(PUNICA_CPU, "bgmv_expand_slice", why=_WHY, upstream="vllm-project/vllm#48421",
          params=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "slice_offset", "slice_size",
                  "add_inputs")),
]
# The shared-memory ring buffers between a vLLM engine core and its worker process (the CPU
# backend always has one: its OpenMP settings need the multiprocess executor).
MESSAGE_QUEUE = Entry(
    "vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.__init__",
    params=("self", "n_reader", "n_local_reader", "local_reader_ranks", "max_chunk_bytes", "max_chunks",
            "connect_ip"),
    why="each of an engine's message queues checks /dev/shm's free space for its whole ring buffer when it is "
        "made, and fails the engine's start with 'Engine core initialization failed' and the cause only in a "
        "Ray worker's log where a container's default 64 MiB is less: e2e_llm.memory.shm_problem says so "
        "first, from these defaults")
ENTRIES = [*CPU_LORA_OPS, MESSAGE_QUEUE]


def check() -> list[str]:
    """Messages for every entry a vLLM upgrade broke (empty: all fine)."""
    return problems(ENTRIES, __name__)


def engine_shm_bytes() -> int:
    """The free space in /dev/shm a vLLM engine with a worker process checks for when it starts:
    its largest message queue's ring buffer (the scheduler's broadcast at
    ``VLLM_MQ_MAX_CHUNK_BYTES_MB`` a chunk, the worker's answers at ``MessageQueue``'s default chunk
    size; ``max_chunks`` chunks each, and a byte a chunk for the writer and its one reader). Each
    queue checks on its own, and their segments fill only as messages are written, so the largest
    must be free, not their sum (measured on vLLM 0.29: 245 MiB of /dev/shm starts an engine, 170
    does not)."""
    import inspect

    import vllm.envs

    defaults = inspect.signature(resolve(MESSAGE_QUEUE, __name__)).parameters
    chunks, answers = defaults["max_chunks"].default, defaults["max_chunk_bytes"].default
    largest = max(vllm.envs.VLLM_MQ_MAX_CHUNK_BYTES_MB * 2**20, answers)
    return (largest + 2) * chunks


# Logged once per vLLM process that gets our ops (a child of vLLM's logger, so it shows in the
# engine's log like vLLM's own lines): a silent replacement would hide what runs.
IN_PLACE_MESSAGE = "e2e-llm: CPU LoRA ops from e2e_llm.cpu_lora_ops in place of vLLM's (vllm-project/vllm#48421)"


def use_grouped_cpu_lora_ops() -> list[str]:
    """Rebind the CPU backend's LoRA ops to :mod:`e2e_llm.cpu_lora_ops`; returns the names it
    rebound (none when they already were). A :class:`~e2e_llm.compat.CompatError` if vLLM moved
    or re-signed one."""
    import importlib

    from e2e_llm import cpu_lora_ops

    for entry in CPU_LORA_OPS:
        resolve(entry, __name__)
    module = importlib.import_module(PUNICA_CPU)
    rebound = [entry.name for entry in CPU_LORA_OPS if getattr(module, entry.name) is not cpu_lora_ops.OPS[entry.name]]
    for name in rebound:
        setattr(module, name, cpu_lora_ops.OPS[name])
    return rebound


def register() -> None:
    """vLLM's general-plugin hook (called in each of its processes, possibly more than once): on
    the CPU platform, the grouped LoRA ops."""
    import logging

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        rebound = use_grouped_cpu_lora_ops()
    except CompatError as exc:
        # Every engine start fails here until the entry is updated: say how to run without it.
        raise CompatError(f"{exc}. Meanwhile vLLM starts with its own CPU LoRA ops (which apply an adapter "
                          f"to base-model tokens batched with adapter ones) when VLLM_PLUGINS lists the "
                          f"general plugins to load without {PLUGIN_NAME!r} (an empty value loads none)") from exc
    if rebound:
        logging.getLogger("vllm.e2e_llm").info(IN_PLACE_MESSAGE)
