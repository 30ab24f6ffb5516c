# SPDX-License-Identifier: Apache-2.0
"""LoRA training under mixed precision without PEFT's two casts of every adapter input.

PEFT's LoRA layer casts its input to the adapter weights' dtype before ``lora_A``, and
LLaMA-Factory keeps trainable weights in float32. With ``bf16: true`` (or ``fp16: true``) the
Trainer runs the model under autocast, which casts that float32 copy straight back to bf16 for
``lora_A``'s matmul. So every LoRA layer writes two full-size copies of its input each forward
(and their gradients each backward) for the same numbers: bf16 -> float32 -> bf16 is exact. On
the 80gb recipe on an H100 those copies were ~100 of 647 ms a step (bench/RESULTS.md).

While autocast is on, :func:`make_callback`'s callback turns the casts off for the whole training
with PEFT's public ``peft.helpers.disable_input_dtype_casting``; the adapter's weights and
optimizer stay float32 and every matmul gets the same bf16 operands as before. Where nothing
autocasts (float32 training, the CPU profiles' bf16 checkpoints without autocast, see
``e2e_llm.precision``; DeepSpeed, which casts the model itself) it changes nothing. A model whose
own code ran a LoRA layer with autocast switched off would fail loudly (a dtype mismatch in
``lora_A``), not train differently; the recipes' models (Qwen2.5, SmolLM2) do not.
"""

from __future__ import annotations

from typing import Any


def autocast_training(args: Any) -> bool:
    """Whether the Trainer with these ``TrainingArguments`` runs its forward under autocast."""
    return bool(getattr(args, "bf16", False) or getattr(args, "fp16", False)) and not getattr(args, "deepspeed", None)


def make_callback():
    """A transformers ``TrainerCallback`` that keeps LoRA inputs in the autocast dtype while training."""
    from peft.helpers import disable_input_dtype_casting
    from transformers import TrainerCallback

    class LoraInputsInAutocastDtype(TrainerCallback):
        def __init__(self) -> None:
            self._context = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None or self._context is not None or not autocast_training(args):
                return
            self._context = disable_input_dtype_casting(model)
            self._context.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            if self._context is not None:
                self._context.__exit__(None, None, None)
                self._context = None

    return LoraInputsInAutocastDtype()
