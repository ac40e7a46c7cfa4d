"""Optional expert capacity: exact dropped counts on constructed cases and against a brute-force queue, skipped
tokens carried by the residual alone, nothing dropped without a capacity, statistics reported per layer."""

import contextlib
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from modeling_moe import MoEForCausalLM
from modeling_moe.gating import apply_expert_capacity, expert_capacity

from .conftest import tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _brute_force(
    index: list[list[int]], weights: list[list[float]], valid: list[bool], num_experts: int, capacity: int
):
    """Each expert takes assignments in order of choice rank, then token, up to `capacity`."""
    taken = [0] * num_experts
    keep = [[True] * len(row) for row in index]
    dropped = 0
    for slot in range(len(index[0])):
        for t, row in enumerate(index):
            if not valid[t] or weights[t][slot] == 0:
                continue
            if taken[row[slot]] < capacity:
                taken[row[slot]] += 1
            else:
                keep[t][slot] = False
                dropped += 1
    return keep, dropped, taken


def test_constructed_case_drops_exactly():
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0]])
    weights = torch.full((5, 2), 0.5)
    new_weights, dropped, tokens_per_expert = apply_expert_capacity(index, weights, num_experts=3, capacity=2)
    # First choices: tokens 0, 1 fill expert 0, token 2 is dropped there; second choices: token 0 -> 1, token 1 -> 2
    # fit, token 2 -> 1, token 3 -> 0 and token 4 -> 0 are over capacity.
    assert int(dropped) == 4
    assert torch.equal(new_weights, torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.5, 0.0], [0.5, 0.0]]))
    assert torch.equal(tokens_per_expert, torch.tensor([2.0, 2.0, 2.0]))
    # A padding token takes no capacity and is never dropped; nor does a slot with weight 0.
    mask = torch.tensor([1, 0, 1, 1, 1])
    new_weights, dropped, _ = apply_expert_capacity(index, weights, 3, 2, mask)
    assert int(dropped) == 3  # token 2's second choice, tokens 3 and 4's second choices
    assert torch.equal(new_weights[1], weights[1])
    zero_slot = weights.clone()
    zero_slot[0, 0] = 0.0
    _, dropped, tokens_per_expert = apply_expert_capacity(index, zero_slot, 3, 2)
    assert int(dropped) == 3 and tokens_per_expert[0] == 2
    # Capacity large enough: nothing dropped, weights unchanged.
    new_weights, dropped, _ = apply_expert_capacity(index, weights, 3, 5)
    assert int(dropped) == 0 and torch.equal(new_weights, weights)
    with pytest.raises(ValueError, match="`capacity` must be >= 0, got -1"):
        apply_expert_capacity(index, weights, 3, -1)


@pytest.mark.parametrize("seed, capacity", list(itertools.product(range(4), (0, 1, 3, 6))))
def test_matches_brute_force_queue(seed, capacity):
    generator = torch.Generator().manual_seed(seed)
    num_tokens, num_experts, slots = 17, 5, 3
    index = torch.stack([torch.randperm(num_experts, generator=generator)[:slots] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, slots, generator=generator)
    weights[weights < 0.1] = 0.0
    mask = (torch.rand(num_tokens, generator=generator) > 0.2).long()
    new_weights, dropped, tokens_per_expert = apply_expert_capacity(index, weights, num_experts, capacity, mask)
    keep, expected_dropped, taken = _brute_force(
        index.tolist(), weights.tolist(), mask.bool().tolist(), num_experts, capacity
    )
    assert int(dropped) == expected_dropped
    assert torch.equal(new_weights, weights * torch.tensor(keep))
    assert tokens_per_expert.tolist() == taken


def test_capacity_formula_and_config_validation():
    assert expert_capacity(1.25, 2, 10, 4) == 7  # ceil(6.25)
    assert expert_capacity(1.0, 2, 12, 6) == 4
    assert (
        tiny_config(
            router_type="hierarchical", num_experts=12, num_expert_groups=3, num_groups_per_tok=2
        ).experts_per_token
        == 4
    )
    for bad in (0, -0.5):
        with pytest.raises(
            ValueError, match=f"`expert_capacity_factor` must be a finite number > 0 or None, got {bad}"
        ):
            tiny_config(expert_capacity_factor=bad)


def _model(**overrides) -> MoEForCausalLM:
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.gate." in name:
                param.normal_(0, 0.3)
    return model


def test_model_drops_exactly_what_the_queue_says_and_the_residual_carries_skipped_tokens():
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    model = _model(expert_capacity_factor=0.5).train()  # capacity ceil(0.5 * 2 * 17 / 6) = 3
    block = model.model.layers[1].mlp
    captured = {}
    block.gate.register_forward_hook(lambda module, args, out: captured.update(index=out[2], weights=out[1]))
    block.register_forward_hook(lambda module, args, out: captured.update(output=out[0]))
    torch.manual_seed(5)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    valid = mask.reshape(-1).bool().tolist()
    keep, expected, taken = _brute_force(captured["index"].tolist(), captured["weights"].tolist(), valid, 6, 3)
    router_output = out.router_outputs[0]
    assert expected > 0 and int(router_output.dropped_tokens) == expected
    assert router_output.tokens_per_expert.tolist() == taken
    assert max(taken) <= 3
    # A token every one of whose experts was full gets no expert output: the residual alone carries it.
    skipped = [t for t, row in enumerate(keep) if valid[t] and not any(row)]
    assert skipped, "the constructed batch should have a fully skipped token"
    assert torch.equal(captured["output"].reshape(-1, 32)[skipped], torch.zeros(len(skipped), 32))
    stats = model.pop_expert_statistics()
    assert stats["layer_1/dropped_tokens"] == expected
    # Evaluation never drops: it routes like the model without capacity.
    model.eval()
    evaluated = model(input_ids=ids, attention_mask=mask)
    assert int(evaluated.router_outputs[0].dropped_tokens) == 0
    reference = _model().eval()
    assert torch.equal(evaluated.logits, reference(input_ids=ids, attention_mask=mask).logits)


def test_hierarchical_capacity_counts_every_expert_a_token_takes():
    """With the hierarchical router a token takes k1 * k2 experts (`experts_per_token`), so an expert's capacity is
    ceil(factor * k1 * k2 * |X| / n), and the model drops exactly what the queue with that capacity drops."""
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    model = _model(
        router_type="hierarchical",
        num_experts=12,
        num_expert_groups=3,
        num_groups_per_tok=2,
        expert_capacity_factor=1.0,
    ).train()
    captured = {}
    model.model.layers[1].mlp.gate.register_forward_hook(
        lambda module, args, out: captured.update(index=out[2], weights=out[1])
    )
    router_output = model(input_ids=ids, attention_mask=mask).router_outputs[0]
    capacity = math.ceil(1.0 * (2 * 2) * 17 / 12)  # 6; k = 2 alone would give 3
    valid = mask.reshape(-1).bool().tolist()
    keep, expected, taken = _brute_force(captured["index"].tolist(), captured["weights"].tolist(), valid, 12, capacity)
    assert expected > 0 and int(router_output.dropped_tokens) == expected
    assert router_output.tokens_per_expert.tolist() == taken and max(taken) == capacity


def test_without_capacity_nothing_is_dropped():
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    results = {}
    for factor in (None, 3.0):  # 3.0: capacity = ceil(3 * 2 * 20 / 6) = 20 = every token
        model = _model(expert_capacity_factor=factor).train()
        torch.manual_seed(7)
        results[factor] = model(input_ids=ids, labels=ids)
        stats = model.pop_expert_statistics()
        assert ("layer_1/dropped_tokens" in stats) == (factor is not None)
    assert results[None].router_outputs[0].dropped_tokens is None
    assert int(results[3.0].router_outputs[0].dropped_tokens) == 0
    assert torch.equal(results[None].logits, results[3.0].logits)
    assert torch.equal(
        results[None].router_outputs[0].tokens_per_expert, results[3.0].router_outputs[0].tokens_per_expert
    )


@pytest.mark.parametrize(
    "overrides",
    [dict(expert_capacity_factor=0.5), dict(router_type="balanced")],
    ids=["over_capacity", "balanced_unused_slots"],
)
def test_experts_compute_only_the_assignments_with_a_nonzero_gate(overrides):
    """SPEC §1: only experts with G(x)_i != 0 are computed. Assignments over capacity and the balanced router's unused
    slots (weight 0) reach the experts as the skipped sentinel id, with the same loss and gradients as transformers'
    `grouped_mm`, which computes every slot."""
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(3))
    results = {}
    for implementation in ("moe_fused", "eager", "grouped_mm"):
        model = _model(**overrides).train()
        model.set_experts_implementation(implementation)
        captured = {}
        model.model.layers[1].mlp.experts.register_forward_pre_hook(
            lambda module, args, captured=captured: captured.update(index=args[1], weights=args[2])
        )
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        zero = captured["weights"] == 0
        assert zero.any(), "the constructed batch should have zero-weight slots"
        skipped = captured["index"] >= 6
        if implementation == "grouped_mm":  # it takes no sentinel outside expert parallelism: every slot is computed
            assert not skipped.any()
        else:
            assert torch.equal(skipped, zero)
        results[implementation] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    reference_loss, reference_grads = results["grouped_mm"]
    for implementation in ("moe_fused", "eager"):
        loss, grads = results[implementation]
        assert torch.allclose(loss, reference_loss, atol=1e-6)
        for name, grad in grads.items():
            assert torch.allclose(grad, reference_grads[name], atol=1e-5), (implementation, name)


def test_zero_weight_slots_benchmark_compares_with_computing_them(tmp_path):
    """scripts/benchmark_zero_weight_slots.py: its "computed" variant really hands every slot to the experts, and a
    tiny run writes its table with the slot counts."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "zero_weight_slots", root / "scripts" / "benchmark_zero_weight_slots.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    arguments = ["--experts", "8", "--top-k", "2", "--tokens", "64", "--hidden", "32", "--expert-hidden", "16"]
    args = script.argparse.Namespace(top_k=2, tokens=64, hidden=32, expert_hidden=16)
    block = script.build_block("balanced", 8, args)
    captured = {}
    block.experts.register_forward_pre_hook(lambda module, inputs: captured.update(index=inputs[1], weights=inputs[2]))
    x = torch.randn(1, 64, 32)
    for context, expect_sentinels in ((script.zero_weight_slots_computed(), False), (contextlib.nullcontext(), True)):
        with context:
            block(x)
        assert bool((captured["index"] >= 8).any()) == expect_sentinels
        assert (captured["weights"] == 0).any()
    output = tmp_path / "zero_weight_slots.md"
    text = script.main([*arguments, "--repeats", "1", "--output", str(output)])
    assert output.read_text() == text
    row = next(line for line in text.splitlines() if line.startswith("| balanced |")).strip("|").split("|")
    assert int(row[1]) == 8 and int(row[3]) == 64 * 2 < int(row[2]) and all(float(cell) > 0 for cell in row[4:])
