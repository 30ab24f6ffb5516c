# SPDX-License-Identifier: Apache-2.0
"""The one place that decides the floating-point dtype of every stage.

``model.dtype: auto`` (the default) means "what this machine runs fast":

- **CPU**: bfloat16 only where torch's kernels can use native bf16 instructions, float32
  otherwise. Without AVX512_BF16/AMX, bf16 is emulated: a 512x512 matmul on one core runs at
  ~1.4 GFLOP/s in bf16 against ~58 GFLOP/s in fp32 (AVX2; bench/RESULTS.md ``cpu_matmul``), so
  a bf16 model trains ~40x slower there.
- **GPU**: bfloat16 where ``torch.cuda.is_bf16_supported()``, float16 otherwise (V100, T4).

An explicit ``model.dtype`` (or ``batch.dtype``) in the profile always wins.

The CPU signal uses public torch APIs only, and all three parts must agree:

1. ``torch.cpu.get_capabilities()`` (cpuinfo): the hardware has ``avx512_bf16`` or ``amx_bf16``
   (x86) or ``bf16``/``sve_bf16`` (Arm);
2. ``torch.backends.cpu.get_cpu_capability()``: the ISA ATen dispatches its kernels to is not
   capped below AVX-512 (``ATEN_CPU_CAPABILITY=avx2`` makes it report ``AVX2``);
3. ``ONEDNN_MAX_CPU_ISA`` (oneDNN runs bf16 matmuls), if set, is not below ``AVX512_CORE_BF16``.

``torch.backends.cpu.get_cpu_capability()`` alone cannot tell: it reports ``AVX512`` on an
AVX-512 CPU with or without bf16 instructions. The capability string goes into the reason that
the run and batch manifests record.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DTYPES = ("bfloat16", "float16", "float32")
Device = Literal["cpu", "cuda"]
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) below the first one with bf16 dot products.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI")
X86_BF16_FEATURES = ("avx512_bf16", "amx_bf16")
ARM_BF16_FEATURES = ("bf16", "sve_bf16")


class PrecisionError(ValueError):
    """An unknown dtype name."""


@dataclass(frozen=True)
class CpuSignals:
    """What torch reports about this CPU (fakeable in tests)."""

    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, SVE256, DEFAULT, ...
    features: tuple[str, ...] = ()  # bf16 features present (from torch.cpu.get_capabilities())
    onednn_max_isa: str | None = None  # $ONEDNN_MAX_CPU_ISA (or $DNNL_MAX_CPU_ISA)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    reason: str
    requested: str = "auto"
    device: str = "cpu"
    signals: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.dtype} on {self.device} ({self.reason})"


def cpu_signals() -> CpuSignals:
    import torch

    caps = torch.cpu.get_capabilities()
    features = tuple(name for name in (*X86_BF16_FEATURES, *ARM_BF16_FEATURES) if caps.get(name))
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None
    return CpuSignals(capability=torch.backends.cpu.get_cpu_capability(), features=features, onednn_max_isa=isa)


def cpu_native_bf16(signals: CpuSignals) -> tuple[bool, str]:
    """Whether bf16 runs natively on this CPU, and why (the reason names the capability)."""
    capability = signals.capability
    x86 = [f for f in signals.features if f in X86_BF16_FEATURES]
    arm = [f for f in signals.features if f in ARM_BF16_FEATURES]
    if x86:
        if not capability.upper().startswith("AVX512"):
            return False, f"CPU {capability}: ATen kernels capped below AVX-512, {'+'.join(x86)} unused"
        if signals.onednn_max_isa and signals.onednn_max_isa.upper() in ONEDNN_ISAS_WITHOUT_BF16:
            return False, f"CPU {capability}: ONEDNN_MAX_CPU_ISA={signals.onednn_max_isa} disables {'+'.join(x86)}"
        return True, f"CPU {capability} with {'+'.join(x86)}: native bf16"
    if arm:
        return True, f"CPU {capability} with {'+'.join(arm)}: native bf16"
    return False, f"CPU {capability} without AVX512_BF16/AMX: bf16 would be emulated"


def cuda_bf16() -> tuple[bool | None, str]:
    """(supported, device name); None when no GPU is visible from this process (a head node)."""
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU visible here"
    return bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name()


def choose_dtype(requested: str | None = "auto", device: Device = "cpu", *,
                 signals: CpuSignals | None = None, gpu: tuple[bool | None, str] | None = None) -> DtypeChoice:
    """The dtype for a stage on ``device``: ``requested`` when explicit, else the machine's choice.

    ``signals`` / ``gpu`` replace the probes (tests fake each capability with them)."""
    requested = requested or "auto"
    if requested != "auto" and requested not in DTYPES:
        raise PrecisionError(f"dtype {requested!r}: expected auto or one of {', '.join(DTYPES)}")
    if device == "cpu":
        signals = signals or cpu_signals()
        native, why = cpu_native_bf16(signals)
        info = {"cpu_capability": signals.capability, "bf16_features": list(signals.features),
                "onednn_max_isa": signals.onednn_max_isa}
        if requested != "auto":
            return DtypeChoice(requested, f"pinned in the profile; {why}", requested, device, info)
        return DtypeChoice("bfloat16" if native else "float32", why, requested, device, info)
    if device != "cuda":
        raise PrecisionError(f"device {device!r}: expected cpu or cuda")
    if requested != "auto":
        # No probe: rendered manifests must not depend on the machine that renders them.
        return DtypeChoice(requested, "pinned in the profile", requested, device, {})
    supported, name = gpu or cuda_bf16()
    info = {"gpu": name, "bf16_supported": supported}
    if supported is None:
        # The driver of a cluster job often runs on a CPU head node: GPUs that this project
        # targets (A10G, L4, A100, H100) all have bf16; pin model.dtype for older cards.
        return DtypeChoice("bfloat16", "GPU not visible from this process: bf16 assumed (pin model.dtype: "
                           "float16 for V100/T4)", requested, device, info)
    if supported:
        return DtypeChoice("bfloat16", f"GPU {name} supports bf16", requested, device, info)
    return DtypeChoice("float16", f"GPU {name} has no bf16", requested, device, info)


def llamafactory_precision(choice: DtypeChoice) -> dict[str, bool]:
    """LLaMA-Factory's precision keys for a training dtype.

    GPU: mixed precision through ``bf16``/``fp16``. CPU: neither (HF's CPU autocast is slower
    here); LLaMA-Factory loads the weights in the checkpoint's dtype (``torch_dtype="auto"``),
    so the checkpoint itself must be in the chosen dtype (``e2e-llm model`` converts it so) and
    the LoRA weights train in fp32 on top."""
    if choice.device == "cpu":
        return {"bf16": False, "fp16": False}
    return {"bf16": choice.dtype == "bfloat16", "fp16": choice.dtype == "float16"}


def train_device(config) -> Device:
    return "cuda" if config.train.use_gpu else "cpu"


def batch_device(config) -> Device:
    return "cuda" if config.batch.num_gpus_per_engine > 0 else "cpu"


def serve_device(config) -> Device:
    return "cuda" if config.serve.num_gpus_per_replica > 0 else "cpu"


def model_dtype(config) -> DtypeChoice:
    """The base checkpoint's dtype: the training device's choice (training loads it as saved)."""
    return choose_dtype(config.model.dtype, train_device(config))


def batch_dtype(config) -> DtypeChoice:
    """The batch engine's dtype: ``batch.dtype`` when pinned, else ``model.dtype`` on the batch device."""
    requested = config.batch.dtype if config.batch.dtype not in (None, "auto") else config.model.dtype
    return choose_dtype(requested, batch_device(config))


def serve_dtype(config) -> DtypeChoice:
    return choose_dtype(config.model.dtype, serve_device(config))


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise PrecisionError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)
