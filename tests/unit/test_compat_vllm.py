# SPDX-License-Identifier: Apache-2.0
"""The private vLLM names in e2e_llm.compat.vllm: each resolves in the pinned vLLM with the
parameters e2e_llm.cpu_lora_ops mirrors, the plugin vLLM loads puts our ops in place on CPU,
and ours agree with vLLM's own wherever vLLM's are right."""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from e2e_llm import cpu_lora_ops  # noqa: E402
from e2e_llm.compat import CompatError, resolve  # noqa: E402
from e2e_llm.compat import vllm as compat  # noqa: E402


def test_every_private_vllm_name_resolves_in_the_pinned_vllm():
    assert compat.check() == []


def test_our_ops_take_the_parameters_of_the_ones_they_replace():
    for entry in compat.CPU_LORA_OPS:
        assert tuple(inspect.signature(cpu_lora_ops.OPS[entry.name]).parameters) == entry.params, entry.name


def test_a_re_signed_op_fails_naming_the_entry_and_why(monkeypatch):
    module = importlib.import_module(compat.PUNICA_CPU)
    monkeypatch.setattr(module, "bgmv_expand", lambda inputs, weights, out, indices: None)
    with pytest.raises(CompatError, match=r"punica_cpu\.bgmv_expand: signature changed.*last slot's adapter"):
        resolve(compat.CPU_LORA_OPS[4], compat.__name__)
    with pytest.raises(CompatError):
        compat.use_grouped_cpu_lora_ops()
    # what an engine start then shows says how to start without the plugin
    with pytest.raises(CompatError, match=r"bgmv_expand: signature changed.*VLLM_PLUGINS.*'e2e_llm_cpu_lora'"):
        compat.register()


@pytest.fixture
def vllms_own_ops(monkeypatch):
    """The CPU wrapper's module with vLLM's own ops bound (as before any plugin ran; an earlier
    test may have started an engine config, which loads plugins); restored after the test."""
    from vllm.lora.ops import torch_ops

    module = importlib.import_module(compat.PUNICA_CPU)
    for name in cpu_lora_ops.OPS:
        monkeypatch.setattr(module, name, getattr(torch_ops, name))
    return module


def test_the_installed_package_is_a_vllm_plugin_that_puts_our_ops_in_place_on_cpu(vllms_own_ops):
    [plugin] = [p for p in entry_points(group="vllm.general_plugins") if p.name == compat.PLUGIN_NAME]
    assert plugin.load() is compat.register
    module = vllms_own_ops
    from vllm.platforms import current_platform

    assert current_platform.is_cpu()
    assert compat.use_grouped_cpu_lora_ops() == [entry.name for entry in compat.CPU_LORA_OPS]
    assert compat.use_grouped_cpu_lora_ops() == []  # vLLM may load plugins more than once per process
    assert all(getattr(module, name) is op for name, op in cpu_lora_ops.OPS.items())


def test_the_plugin_says_once_per_process_that_our_ops_are_in_place(vllms_own_ops, caplog):
    with caplog.at_level("INFO", logger="vllm.e2e_llm"):
        compat.register()
        compat.register()
    assert [r.getMessage() for r in caplog.records if r.name == "vllm.e2e_llm"] == [compat.IN_PLACE_MESSAGE]


def test_ours_agree_with_vllms_ops_for_adapter_tokens_and_differ_where_vllm_applies_the_last_slot():
    from vllm.lora.ops import torch_ops as vllm_ops

    torch.manual_seed(0)
    weights = torch.randn(3, 1, 8, 32)  # three slots, each holding an adapter
    x = torch.randn(6, 32)
    adapter_tokens = torch.tensor([0, 0, 2, 1, 1, 2])
    ours, theirs = torch.zeros(6, 8), torch.zeros(6, 8)
    cpu_lora_ops.bgmv_shrink(x, weights, ours, adapter_tokens, 0.5)
    vllm_ops.bgmv_shrink(x, weights, theirs, adapter_tokens, 0.5)
    torch.testing.assert_close(ours, theirs)

    with_base = torch.tensor([0, -1, 2, -1, 1, 2])
    cpu_lora_ops.bgmv_shrink(x, weights, ours, with_base, 0.5)
    vllm_ops.bgmv_shrink(x, weights, theirs, with_base, 0.5)
    assert torch.all(ours[with_base < 0] == 0)
    # If this fails, vLLM now skips tokens without an adapter (vllm-project/vllm#48421): our ops
    # may then only be needed for speed (bench/RESULTS.md, "LoRA on CPU").
    torch.testing.assert_close(theirs[1], 0.5 * weights[-1, 0] @ x[1])
