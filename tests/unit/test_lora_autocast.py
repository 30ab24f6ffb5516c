# SPDX-License-Identifier: Apache-2.0
"""e2e_llm.lora_autocast: under bf16 autocast, LoRA layers skip PEFT's input casts and train to
the same numbers; without autocast nothing changes, and PEFT's setting is restored at the end."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from e2e_llm import lora_autocast  # noqa: E402

BF16 = SimpleNamespace(bf16=True, fp16=False, deepspeed=None)
FP32 = SimpleNamespace(bf16=False, fp16=False, deepspeed=None)


def _lora_model():
    """A tiny bf16 Qwen2 with LoRA on every linear layer, trainable weights in float32 as
    LLaMA-Factory keeps them, and non-zero lora_B so the adapter branch counts."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    base = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.float()
                if "lora_B" in name:
                    param.normal_(0.0, 0.02)
    return model


def _tuner_flags(model) -> set[bool]:
    tuner_layer = peft.tuners.tuners_utils.BaseTunerLayer
    return {m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, tuner_layer)}


def _train_step(model, args, callback):
    """One forward and backward under bf16 autocast: loss, adapter grads, and the casts the
    forward ran (``aten::_to_copy``)."""
    if callback is not None:
        callback.on_train_begin(args, None, None, model=model)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    casts = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, casts


def test_under_autocast_lora_inputs_are_not_cast_and_training_is_unchanged():
    model = _lora_model()
    loss_cast, grads_cast, casts_before = _train_step(copy.deepcopy(model), BF16, None)
    callback = lora_autocast.make_callback()
    loss, grads, casts_after = _train_step(model, BF16, callback)
    assert _tuner_flags(model) == {False}
    # two casts fewer per LoRA layer (to float32 and back), the same loss and gradients, bit for bit
    lora_layers = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())
    assert casts_before - casts_after >= 2 * lora_layers > 0
    assert torch.equal(loss, loss_cast)
    assert grads.keys() == grads_cast.keys() and grads
    assert all(torch.equal(grads[n], grads_cast[n]) for n in grads)
    assert all(g.dtype == torch.float32 for g in grads.values())  # the adapter still trains in float32
    callback.on_train_end(BF16, None, None)
    assert _tuner_flags(model) == {True}  # PEFT's own setting back after training


@pytest.mark.parametrize("args", [FP32, SimpleNamespace(bf16=True, fp16=False, deepspeed="ds.json")])
def test_without_autocast_by_the_trainer_nothing_changes(args):
    model = _lora_model()
    callback = lora_autocast.make_callback()
    callback.on_train_begin(args, None, None, model=model)
    assert _tuner_flags(model) == {True}
    callback.on_train_end(args, None, None)
    assert _tuner_flags(model) == {True}


def test_autocast_training_reads_the_trainer_precision_flags():
    assert lora_autocast.autocast_training(BF16)
    assert lora_autocast.autocast_training(SimpleNamespace(bf16=False, fp16=True, deepspeed=None))
    assert not lora_autocast.autocast_training(FP32)
    assert not lora_autocast.autocast_training(SimpleNamespace(bf16=True, fp16=False, deepspeed={"zero": 2}))


def test_every_training_of_ours_runs_with_it():
    from e2e_llm.train_worker import training_callbacks

    names = [type(cb).__qualname__ for cb in training_callbacks()]  # the worker's and the benches' direct runs'
    assert names.count(type(lora_autocast.make_callback()).__qualname__) == 1
