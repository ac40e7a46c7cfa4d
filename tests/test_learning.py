"""The model learns, and the balancing losses balance: a few hundred AdamW steps on a small fixed text."""

from pydoc_data.topics import topics

import pytest
import torch

from modeling_moe import MoEConfig, MoEForCausalLM

BLOCK = 64


def _fixed_text() -> torch.Tensor:
    """60 kB of real English/Python text shipped with every CPython (the pydoc topics), as byte ids."""
    text = "".join(topics[key] for key in sorted(topics)[:40]).encode("utf-8")[:60_000]
    return torch.tensor(list(text))


def _train(data: torch.Tensor, coef: float, steps: int = 300, seed: int = 0):
    torch.manual_seed(seed)
    config = MoEConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=16,
        num_experts_per_tok=2,
        expert_intermediate_size=64,
        moe_layers="all",
        importance_loss_coef=coef,
        load_loss_coef=coef,
        max_position_embeddings=BLOCK,
    )
    model = MoEForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - BLOCK - 1, (16,), generator=generator)
        batch = torch.stack([data[s : s + BLOCK] for s in starts])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    model.eval()
    with torch.no_grad():
        held_out = torch.stack([data[s : s + BLOCK] for s in range(0, 32 * BLOCK, BLOCK)])
        out = model(input_ids=held_out)
    cv_load = [router_output.cv_load.item() for router_output in out.router_outputs]
    return losses, cv_load


@pytest.fixture(scope="module")
def runs():
    data = _fixed_text()
    return {coef: _train(data, coef) for coef in (0.0, 0.1)}


def test_loss_drops_well_below_its_start(runs):
    # Measured (2 CPU cores, torch 2.13.0): 5.57 -> ~1.80 (no balancing) and ~1.92 (balancing 0.1/0.1).
    for losses, _ in runs.values():
        assert losses[0] > 5.0  # ln(256) = 5.55: an untrained byte model
        assert sum(losses[-20:]) / 20 < 2.3


def test_balancing_losses_lower_cv_load(runs):
    # Measured: CV(Load) per layer ~[1.70, 1.98] without balancing, ~[0.50, 0.70] with w_importance = w_load = 0.1.
    _, unbalanced = runs[0.0]
    _, balanced = runs[0.1]
    assert min(unbalanced) > 1.2
    assert max(balanced) < 0.95
    assert sum(balanced) < 0.5 * sum(unbalanced)
