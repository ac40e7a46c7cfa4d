"""The FLOP count behind `moe-bench --mode model`'s utilisation column (modeling_moe/cli/flop_count.py): the formulas it
adds to torch's counter agree with torch's own counts of the same computation done with `mm` and `bmm`."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_moe import MoEForCausalLM, fast_experts
from modeling_moe.cli.flop_count import EXTRA_FLOP_FORMULAS, grouped_mm_flop, training_step_flops
from modeling_moe.fast_experts import FAST_EXPERTS_IMPLEMENTATION

from .conftest import tiny_config, tiny_olmoe


def _models():
    torch.manual_seed(0)
    # every layer MoE, SwiGLU and ReLU experts, grouped-query attention
    yield MoEForCausalLM(tiny_config(moe_layers="all", expert_activation="swiglu"))
    yield MoEForCausalLM(tiny_config(moe_layers="all", expert_activation="relu"))
    yield tiny_olmoe()


@pytest.mark.parametrize("model", list(_models()), ids=["ours-swiglu", "ours-relu", "olmoe"])
def test_grouped_mm_count_equals_torch_count_of_the_per_expert_mms(model):
    """transformers' `grouped_mm` experts (counted by our `_grouped_mm` formula, forward and backward) do the same
    products as `moe_fused`, which runs one `mm` per expert on CPU (counted by torch's `mm` formula)."""
    ids = torch.randint(1, model.config.vocab_size, (2, 12))
    model.train()
    counts = {}
    for implementation in ("grouped_mm", FAST_EXPERTS_IMPLEMENTATION):
        model.set_experts_implementation(implementation)
        counts[implementation] = training_step_flops(model, ids)
    no_experts = FlopCounterMode(display=False)  # torch alone does not know `_grouped_mm`
    model.set_experts_implementation("grouped_mm")
    with no_experts:
        model(input_ids=ids, labels=ids).loss.backward()
    assert counts["grouped_mm"] == counts[FAST_EXPERTS_IMPLEMENTATION] > no_experts.get_total_flops()


def test_grouped_mm_formula_against_the_products_one_by_one():
    counts = [3, 0, 5]  # rows per group, one group empty
    rows, k, n = sum(counts), 8, 6
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    brute = sum(2 * c * k * n for c in counts)
    assert grouped_mm_flop((rows, k), (len(counts), k, n), offs.shape, out_shape=(rows, n)) == brute  # x @ W[e]
    assert grouped_mm_flop((k, rows), (rows, n), offs.shape, out_shape=(len(counts), k, n)) == brute  # x_e^T @ g_e
    assert grouped_mm_flop((4, 5, k), (4, k, n), out_shape=(4, 5, n)) == 2 * 4 * 5 * k * n  # batched, no offs


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_cpu_sdpa_count_equals_eager_attention_count(num_key_value_heads):
    """Forward: PyTorch's CPU flash attention counts what transformers' eager attention (matmuls) does. Backward: the
    same plus the recomputed scores (torch's convention for flash attention), one `q @ k^T` per layer."""
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=num_key_value_heads)
    model = MoEForCausalLM(config).train()
    batch, seq = 2, 12
    ids = torch.randint(1, config.vocab_size, (batch, seq))
    forward, training = {}, {}
    for attention in ("sdpa", "eager"):
        model.set_attn_implementation(attention)
        counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)
        with counter, torch.no_grad():
            model(input_ids=ids)
        forward[attention] = counter.get_total_flops()
        training[attention] = training_step_flops(model, ids)
    head_dim = config.hidden_size // config.num_attention_heads
    recompute = config.num_hidden_layers * 2 * batch * config.num_attention_heads * seq * seq * head_dim
    assert forward["sdpa"] == forward["eager"]
    assert training["sdpa"] == training["eager"] + recompute


def test_count_includes_the_experts_work_done_in_worker_threads(monkeypatch):
    """`moe_fused` runs its blocks in worker threads (several blocks, two intra-op threads), which a dispatch mode in
    the calling thread would not see: under one it runs them in that thread, and the count is the same as through
    `grouped_mm`."""
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(moe_layers="all")).train()
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 4 * model.config.expert_intermediate_size * 4)  # 4-row blocks
    ids = torch.randint(1, model.config.vocab_size, (4, 16))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        counts = {}
        for implementation in ("grouped_mm", FAST_EXPERTS_IMPLEMENTATION):
            model.set_experts_implementation(implementation)
            counts[implementation] = training_step_flops(model, ids)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert counts["grouped_mm"] == counts[FAST_EXPERTS_IMPLEMENTATION]
