# SPDX-License-Identifier: Apache-2.0
"""Build small LoRA adapters in-process for tests that need an adapter other than the trained
one: an untrained (identity) adapter, a deliberately damaged one, or one from a few steps."""

from __future__ import annotations

import json
from pathlib import Path


def make_lora_adapter(base: Path, out: Path, *, rows: list[dict] | None = None, steps: int = 0,
                      damaged: bool = False, rank: int = 8, seed: int = 0, lr: float = 1e-3) -> Path:
    """Save a peft LoRA adapter for ``base`` to ``out``.

    steps=0, damaged=False: the LoRA update is zero (answers equal the base model).
    damaged=True: random A and B matrices scaled up, so the answers are garbage.
    steps>0: that many AdamW steps on ``rows`` (alpaca dicts) in the project's chat layout.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", task_type="CAUSAL_LM",
                        init_lora_weights=not damaged)
    model = get_peft_model(model, config)
    if damaged:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.5)
    if steps:
        assert rows, "steps > 0 needs rows"
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for step in range(steps):
            row = rows[step % len(rows)]
            messages = [{"role": "system", "content": row["instruction"]}, {"role": "user", "content": row["input"]}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            full = prompt + row["output"] + tokenizer.eos_token
            ids = tokenizer(full, return_tensors="pt")["input_ids"]
            labels = ids.clone()
            labels[:, : len(tokenizer(prompt)["input_ids"])] = -100
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(out)
    (Path(out) / "e2e_test_adapter.json").write_text(json.dumps({"steps": steps, "damaged": damaged}) + "\n")
    return Path(out)
