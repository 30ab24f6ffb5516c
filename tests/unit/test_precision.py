# SPDX-License-Identifier: Apache-2.0
"""One function decides every stage's dtype: each CPU/GPU capability faked, plus profile pins."""

import platform

import pytest

from e2e_llm.config import load_profile
from e2e_llm.precision import (
    CpuSignals,
    PrecisionError,
    batch_dtype,
    choose_dtype,
    cpu_signals,
    llamafactory_precision,
    model_dtype,
    serve_dtype,
)

AVX2 = CpuSignals("AVX2")  # AMD Zen 2/3, Intel client chips
AVX512 = CpuSignals("AVX512")  # Skylake/Cascade Lake server: AVX-512 without bf16 instructions
AVX512_BF16 = CpuSignals("AVX512", ("avx512_bf16",))  # Cooper Lake, Zen 4
AMX = CpuSignals("AVX512", ("avx512_bf16", "amx_bf16"))  # Sapphire Rapids and later
GRAVITON3 = CpuSignals("SVE256", ("bf16", "sve_bf16"))
GRAVITON2 = CpuSignals("DEFAULT")


@pytest.mark.parametrize(("signals", "dtype", "says"), [
    (AVX2, "float32", "CPU AVX2 without AVX512_BF16/AMX"),
    (AVX512, "float32", "CPU AVX512 without AVX512_BF16/AMX"),
    (AVX512_BF16, "bfloat16", "CPU AVX512 with avx512_bf16: native bf16"),
    (AMX, "bfloat16", "CPU AVX512 with avx512_bf16+amx_bf16: native bf16"),
    (GRAVITON3, "bfloat16", "CPU SVE256 with bf16+sve_bf16"),
    (GRAVITON2, "float32", "CPU DEFAULT without"),
])
def test_auto_on_cpu_uses_bf16_only_with_native_support(signals, dtype, says):
    choice = choose_dtype("auto", "cpu", signals=signals)
    assert choice.dtype == dtype and says in choice.reason
    assert choice.signals["cpu_capability"] == signals.capability


def test_bf16_hardware_with_aten_capped_to_avx2_is_float32():
    # ATEN_CPU_CAPABILITY=avx2 on an AMX machine: the AVX2 reproduction of `make e2e-avx2`.
    choice = choose_dtype("auto", "cpu", signals=CpuSignals("AVX2", ("avx512_bf16", "amx_bf16")))
    assert choice.dtype == "float32" and "capped below AVX-512" in choice.reason


@pytest.mark.parametrize(("isa", "dtype"), [("AVX2", "float32"), ("avx512_core", "float32"),
                                            ("AVX512_CORE_BF16", "bfloat16"), ("AVX512_CORE_AMX", "bfloat16")])
def test_onednn_isa_cap_is_respected(isa, dtype):
    choice = choose_dtype(None, "cpu", signals=CpuSignals("AVX512", ("avx512_bf16", "amx_bf16"), isa))
    assert choice.dtype == dtype
    if dtype == "float32":
        assert f"ONEDNN_MAX_CPU_ISA={isa}" in choice.reason


@pytest.mark.parametrize(("gpu", "dtype"), [((True, "NVIDIA H200"), "bfloat16"), ((False, "Tesla T4"), "float16"),
                                            ((None, "no GPU visible here"), "bfloat16")])
def test_auto_on_gpu(gpu, dtype):
    choice = choose_dtype("auto", "cuda", gpu=gpu)
    assert choice.dtype == dtype and choice.device == "cuda"


@pytest.mark.parametrize("pinned", ["bfloat16", "float32", "float16"])
def test_an_explicit_dtype_wins_on_every_machine(pinned):
    for signals in (AVX2, AMX):
        choice = choose_dtype(pinned, "cpu", signals=signals)
        assert choice.dtype == pinned and choice.reason.startswith("pinned in the profile")
    assert choose_dtype(pinned, "cuda", gpu=(False, "Tesla T4")).dtype == pinned


def test_unknown_dtype_is_an_error():
    with pytest.raises(PrecisionError, match="dtype 'fp8': expected auto or one of"):
        choose_dtype("fp8", "cpu", signals=AVX2)


def test_llamafactory_keys_are_derived():
    assert llamafactory_precision(choose_dtype("auto", "cuda", gpu=(True, "H200"))) == {"bf16": True, "fp16": False}
    assert llamafactory_precision(choose_dtype("auto", "cuda", gpu=(False, "T4"))) == {"bf16": False, "fp16": True}
    # CPU: no autocast either way; the weights' dtype is the checkpoint's.
    assert llamafactory_precision(choose_dtype("auto", "cpu", signals=AMX)) == {"bf16": False, "fp16": False}


def test_every_stage_of_the_local_profile_follows_the_machine(project_root, monkeypatch):
    from e2e_llm import precision

    config = load_profile("local", root=project_root)
    assert config.model.dtype == "auto"
    for signals, dtype in ((AVX2, "float32"), (AMX, "bfloat16")):
        monkeypatch.setattr(precision, "cpu_signals", lambda s=signals: s)
        assert model_dtype(config).dtype == dtype
        assert serve_dtype(config).dtype == dtype
        # The local profile pins its batch engine to fp32 (a bf16 merge rounds the LoRA update away).
        assert batch_dtype(config).dtype == "float32"
        config.batch.dtype = None
        assert batch_dtype(config).dtype == dtype
        config.batch.dtype = "float32"


def test_engine_kwargs_use_the_choice(project_root, monkeypatch):
    from e2e_llm import precision, serve

    config = load_profile("local", root=project_root)
    monkeypatch.setattr(precision, "cpu_signals", lambda: AVX2)
    assert serve.engine_kwargs(config)["dtype"] == "float32"
    monkeypatch.setattr(precision, "cpu_signals", lambda: AMX)
    assert serve.engine_kwargs(config)["dtype"] == "bfloat16"


def test_cluster_profile_pin_needs_no_probe(project_root, monkeypatch):
    from e2e_llm import precision

    config = load_profile("cluster", root=project_root)
    monkeypatch.setattr(precision, "cuda_bf16", lambda: pytest.fail("probed the GPU for a pinned dtype"))
    assert serve_dtype(config).dtype == "bfloat16" and batch_dtype(config).dtype == "bfloat16"


def test_real_machine_signals_are_well_formed():
    signals = cpu_signals()
    assert signals.capability and isinstance(signals.features, tuple)
    assert choose_dtype("auto", "cpu").dtype in ("bfloat16", "float32")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 reproduction is x86-only")
def test_make_e2e_avx2_env_makes_this_machine_choose_float32():
    """The AVX2 reproduction (Makefile AVX2_ENV) changes what torch reports, so the real probe
    chooses float32 on any x86 CPU, native bf16 or not."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assignments = re.search(r"^AVX2_ENV := (.+)$", makefile, re.M).group(1).split()
    env = {**os.environ, **dict(a.split("=", 1) for a in assignments)}
    code = "from e2e_llm.precision import choose_dtype; c = choose_dtype('auto', 'cpu'); print(c.dtype, c.reason)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("float32 CPU AVX2"), out
