# SPDX-License-Identifier: Apache-2.0
"""Multi-LoRA ops for vLLM's CPU backend: the six functions its ``PunicaWrapperCPU`` calls, with
the same parameters and write semantics, computed one adapter slot at a time.

vLLM 0.29's own versions (``vllm.lora.ops.torch_ops``) gather one weight matrix per token
(``weights[indices]``: tokens x out x in floats per layer) and so have two faults on CPU:

- A token of a request without an adapter carries index -1, which picks the *last* slot's
  adapter: a base-model request batched next to adapter requests silently gets an adapter's
  update once every slot (``max_loras``) holds one (upstream vllm-project/vllm#48421, open).
- The per-token copy makes adapter requests 3.8-4.6x slower than base ones on 2 AVX2 cores
  (bench/RESULTS.md, "LoRA on CPU").

Here each slot present in the batch is one matrix product over its tokens, and tokens with a
negative index get no update. :mod:`e2e_llm.compat.vllm` puts these in place of vLLM's.
"""

from __future__ import annotations

import torch


def lora_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """Row t: ``weights[indices[t]] @ inputs[t]`` in ``dtype``, and zeros where ``indices[t] < 0``
    (no adapter). ``weights``: the stacked slots, (slots, out, in) or (slots, 1, out, in)."""
    stacked = weights.squeeze(1) if weights.dim() == 4 else weights
    x = inputs.to(dtype)
    if torch.compiler.is_compiling():  # an engine without enforce_eager traces the model
        return products_without_branches(x, stacked.to(dtype), indices)
    out = x.new_zeros(x.shape[0], stacked.shape[1])
    slots = torch.unique(indices).tolist()
    for slot in slots:
        if slot < 0:
            continue
        weight_t = stacked[slot].to(dtype).t()
        if len(slots) == 1:  # one adapter for every token: no gather
            torch.mm(x, weight_t, out=out)
        else:
            rows = torch.nonzero(indices == slot).squeeze(1)
            out.index_copy_(0, rows, x.index_select(0, rows) @ weight_t)
    return out


def products_without_branches(x: torch.Tensor, stacked: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """:func:`lora_products` with no data-dependent control flow, which torch.compile cannot
    trace: every token against every slot (slots times the work), then each token's own row."""
    slots, out_dim, _ = stacked.shape
    every = (x @ stacked.reshape(slots * out_dim, -1).t()).view(x.shape[0], slots, out_dim)
    own = every.gather(1, indices.clamp(min=0).view(-1, 1, 1).expand(-1, 1, out_dim)).squeeze(1)
    return own * (indices >= 0).unsqueeze(1).to(own.dtype)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    """``output[:, :rank] = scaling * A[slot] @ x`` per token (the LoRA A product)."""
    products = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, :products.shape[1]] = scaling * products


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    """``output[:, :out] (+)= B[slot] @ x`` per token (the LoRA B product). As in vLLM: only the
    columns both have, the output's rows (one product row is broadcast to all of them)."""
    products = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    columns = min(products.shape[1], output_tensor.shape[1])
    update = products[:output_tensor.shape[0], :columns]
    if add_inputs:
        output_tensor[:, :columns] += update
    else:
        output_tensor[:, :columns] = update


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                      add_inputs=True):
    """``output[:, offset:offset + size] (+)= B[slot] @ x`` per token (one slice of a merged
    projection such as qkv)."""
    products = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset:slice_offset + slice_size] += products
    else:
        output_tensor[:, slice_offset:slice_offset + slice_size] = products


def _token_indices(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """The sgmv form (one slot per run of tokens) as one slot per token."""
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor),
                add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {op.__name__: op for op in (sgmv_shrink, sgmv_expand, sgmv_expand_slice, bgmv_shrink, bgmv_expand,
                                   bgmv_expand_slice)}
