# SPDX-License-Identifier: Apache-2.0
"""e2e_llm.cpu_lora_ops against the LoRA math done one token at a time: every token gets its
own slot's product, a token without an adapter (-1) gets none, and the write semantics
(columns, slices, accumulate or assign, a broadcast row) are those vLLM's CPU wrapper expects."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from e2e_llm import cpu_lora_ops as ops  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 4, 8, 24, 40


def _weights(rows: int, cols: int, *, four_d: bool = True) -> torch.Tensor:
    torch.manual_seed(rows * 1000 + cols)
    w = torch.randn(SLOTS, rows, cols)
    return w.unsqueeze(1) if four_d else w  # vLLM stacks slots as (slots, 1, rows, cols)


def _expected(x: torch.Tensor, w: torch.Tensor, indices: list[int]) -> torch.Tensor:
    w = w.squeeze(1) if w.dim() == 4 else w
    return torch.stack([w[i] @ x[t] if i >= 0 else torch.zeros(w.shape[1]) for t, i in enumerate(indices)])


MIXED = [2, 2, -1, 0, -1, 3, 3, 3]  # three slots and base-model tokens, interleaved


@pytest.mark.parametrize("indices", [MIXED, [1] * 8, [-1] * 8, [3, -1, -1, -1, -1, -1, -1, 3]])
@pytest.mark.parametrize("four_d", [True, False])
def test_shrink_gives_each_token_its_slots_product_and_base_tokens_none(indices, four_d):
    x, w = torch.randn(len(indices), HIDDEN), _weights(RANK, HIDDEN, four_d=four_d)
    out = torch.full((len(indices), RANK + 3), 7.0)
    ops.bgmv_shrink(x, w, out, torch.tensor(indices), 0.5)
    torch.testing.assert_close(out[:, :RANK], 0.5 * _expected(x, w, indices))
    assert torch.all(out[:, RANK:] == 7.0)  # columns past the rank are not the op's


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_adds_or_assigns_the_b_product_on_the_columns_both_have(add_inputs):
    x, w = torch.randn(len(MIXED), RANK), _weights(OUT, RANK)
    out = torch.ones(len(MIXED), OUT - 5)  # the output is narrower than the adapter's rows
    ops.bgmv_expand(x, w, out, torch.tensor(MIXED), add_inputs)
    expected = _expected(x, w, MIXED)[:, :OUT - 5]
    torch.testing.assert_close(out, expected + 1 if add_inputs else expected)


def test_expand_broadcasts_a_single_product_row_to_every_output_row():
    x, w = torch.randn(1, RANK), _weights(OUT, RANK)
    out = torch.zeros(3, OUT)
    ops.bgmv_expand(x, w, out, torch.tensor([1]), add_inputs=True)
    torch.testing.assert_close(out, _expected(x, w, [1]).expand(3, OUT))


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_slice_writes_only_its_slice(add_inputs):
    x, w = torch.randn(len(MIXED), RANK), _weights(16, RANK)
    out = torch.ones(len(MIXED), 48)
    ops.bgmv_expand_slice(x, w, out, torch.tensor(MIXED), 16, 16, add_inputs)
    expected = _expected(x, w, MIXED)
    torch.testing.assert_close(out[:, 16:32], expected + 1 if add_inputs else expected)
    assert torch.all(out[:, :16] == 1) and torch.all(out[:, 32:] == 1)


def test_sgmv_ops_read_slots_per_run_of_tokens():
    """The prefill form: (slot, run length) pairs, as vLLM's unique_consecutive makes them."""
    runs, lengths = torch.tensor([2, -1, 0, 3]), torch.tensor([2, 1, 1, 4])
    per_token = torch.repeat_interleave(runs, lengths).tolist()
    meta = (torch.tensor([0, 2, 3, 4]), lengths, runs, 4, 4, 8)  # starts, lengths, slots, batches, max len, tokens
    x, a, b = torch.randn(8, HIDDEN), _weights(RANK, HIDDEN), _weights(OUT, RANK)
    shrunk = torch.zeros(8, RANK)
    ops.sgmv_shrink(x, a, shrunk, *meta, 2.0)
    torch.testing.assert_close(shrunk, 2.0 * _expected(x, a, per_token))
    expanded, sliced = torch.zeros(8, OUT), torch.zeros(8, OUT + 8)
    ops.sgmv_expand(shrunk, b, expanded, *meta, False)
    ops.sgmv_expand_slice(shrunk, b, sliced, *meta, 8, OUT, True)
    torch.testing.assert_close(expanded, _expected(shrunk, b, per_token))
    torch.testing.assert_close(sliced[:, 8:], expanded)


def test_products_come_out_in_the_output_dtype():
    x, w = torch.randn(len(MIXED), HIDDEN, dtype=torch.bfloat16), _weights(RANK, HIDDEN).to(torch.bfloat16)
    out = torch.zeros(len(MIXED), RANK, dtype=torch.float32)
    ops.bgmv_shrink(x, w, out, torch.tensor(MIXED))
    torch.testing.assert_close(out, _expected(x.float(), w.float(), MIXED))


@pytest.mark.parametrize("indices", [MIXED, [1] * 8, [-1] * 8])
def test_the_branch_free_form_gives_the_same_products(indices):
    x, w = torch.randn(len(indices), HIDDEN), _weights(RANK, HIDDEN, four_d=False)
    torch.testing.assert_close(ops.products_without_branches(x, w, torch.tensor(indices)),
                               _expected(x, w, indices))


def test_torch_compile_traces_the_ops_in_one_graph():
    """vLLM compiles the model (LoRA layers included) unless enforce_eager is set."""
    x, a, b = torch.randn(len(MIXED), HIDDEN), _weights(RANK, HIDDEN), _weights(OUT, RANK)
    indices = torch.tensor(MIXED)

    def layer(x, indices):
        shrunk = torch.zeros(x.shape[0], RANK)
        ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
        out = torch.zeros(x.shape[0], OUT)
        ops.bgmv_expand(shrunk, b, out, indices, True)
        return out

    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # fails on a graph break
    torch.testing.assert_close(compiled(x, indices), layer(x, indices))
