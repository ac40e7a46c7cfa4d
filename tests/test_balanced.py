"""Strictly balanced gating (SPEC §5): the batchwise mask and gate values against a brute-force reference, exactly m
tokens per expert in every training batch, L_batchwise and its threshold gradient, threshold routing at evaluation,
and threshold routing agreeing with the batchwise choice after training."""

import math

import pytest
import torch

from modeling_moe import MoEForCausalLM
from modeling_moe.balanced_gating import BalancedRouter

from .conftest import tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _router(num_experts=6, top_k=2, hidden=8, seed=0, coef=0.5) -> BalancedRouter:
    torch.manual_seed(seed)
    router = BalancedRouter(hidden, num_experts, top_k, batchwise_loss_coef=coef)
    with torch.no_grad():
        router.weight.normal_(0, 0.7)
        router.threshold.normal_(0, 0.3)
    return router


def _dense(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(index.size(0), num_experts).scatter_add(1, index, weights)


def _reference(router: BalancedRouter, x: torch.Tensor, valid: list[bool]):
    """Masks, gates and L_batchwise of SPEC §5 with plain Python loops."""
    logits = (x @ router.weight.T).tolist()
    threshold = router.threshold.tolist()
    n, k = router.num_experts, router.top_k
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    tokens = [t for t in range(len(valid)) if valid[t]]
    m = math.ceil(k * len(tokens) / n)
    batch = [[False] * n for _ in valid]
    for i in range(n):
        for t in sorted(tokens, key=lambda t: -probs[t][i])[:m]:
            batch[t][i] = True
    inference = []
    for row in logits:
        passed = [v > c for v, c in zip(row, threshold, strict=True)]
        if not any(passed):  # fallback: the top-k experts
            top = sorted(range(n), key=lambda i: -row[i])[:k]
            passed = [i in top for i in range(n)]
        inference.append(passed)

    def gates(mask):
        out = []
        for p, keep in zip(probs, mask, strict=True):
            total = sum(v for v, kept in zip(p, keep, strict=True) if kept)
            out.append([v / total if kept else 0.0 for v, kept in zip(p, keep, strict=True)])
        return out

    loss = sum(
        ((row[i] > threshold[i]) - batch[t][i]) * (row[i] - threshold[i])
        for t, row in enumerate(logits)
        if valid[t]
        for i in range(n)
    )
    agreement = sum(inference[t] == batch[t] for t in tokens) / len(tokens)
    return m, batch, gates(batch), inference, gates(inference), loss, agreement


@pytest.mark.parametrize("num_tokens", [12, 13, 30])  # k|X|/n = 4 (exact), 13 * 2 / 6 -> ceil = 5, 30 * 2 / 6 = 10
def test_training_routing_matches_brute_force_reference(num_tokens):
    router = _router().train()
    x = torch.randn(num_tokens + 3, 8, generator=torch.Generator().manual_seed(num_tokens))
    valid = [True] * num_tokens + [False] * 3  # three padding tokens, never taken
    mask = torch.tensor(valid, dtype=torch.long)
    logits, weights, index, out = router(x, mask)
    m, batch, batch_gates, _, _, loss, agreement = _reference(router, x, valid)
    assert m == math.ceil(2 * num_tokens / 6) == router.tokens_per_expert_in_training(num_tokens)
    assert torch.equal(out.tokens_per_expert, torch.full((6,), float(m)))  # exactly m tokens per expert
    assert torch.equal(_dense(index, (weights > 0).float(), 6) > 0, torch.tensor(batch))
    assert torch.allclose(_dense(index, weights, 6), torch.tensor(batch_gates), atol=1e-6)
    assert torch.allclose(out.importance, torch.tensor(batch_gates)[:num_tokens].sum(0), atol=1e-5)
    assert out.batchwise_loss == pytest.approx(0.5 * loss, rel=1e-5)
    assert out.threshold_agreement == pytest.approx(agreement)
    assert torch.allclose(out.load_loss, out.batchwise_loss)  # Load = m everywhere: CV(Load)^2 = 0
    assert logits.shape == (num_tokens + 3, 6)


def test_training_routing_is_exact_when_softmax_values_underflow():
    """Logit gaps of hundreds: float32 G_sigma underflows to 0, yet each expert still takes the tokens where its gate
    is highest (compared in log space), and a token's gates are the softmax over its kept experts (not 0)."""
    router = BalancedRouter(1, 2, 1).train()
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[0.0], [1.0]]))
    # G_sigma(x_0) = (e^-300, 1), G_sigma(x_1) = (e^-200, 1): expert 0's highest gate is token 1's.
    _, weights, index, _ = router(torch.tensor([[300.0], [200.0]]))
    assert index[:, 0].tolist() == [1, 0]
    assert weights[:, 0].tolist() == [1.0, 1.0]


def test_threshold_is_trained_by_batchwise_loss():
    router = _router(coef=0.5).train()
    x = torch.randn(24, 8)
    _, _, _, out = router(x)
    _, batch, *_ = _reference(router, x, [True] * 24)
    out.load_loss.backward()
    thresholds_passed = (x @ router.weight.T > router.threshold).float()
    # d L / d T_i = -sum_x (M_threshold - M_batchwise)_{x,i}: a threshold passing too many tokens goes up.
    expected = -0.5 * (thresholds_passed - torch.tensor(batch).float()).sum(0)
    assert torch.allclose(router.threshold.grad, expected)
    assert router.weight.grad.abs().sum() > 0


def test_evaluation_routes_each_token_by_thresholds_alone():
    router = _router().eval()
    x = torch.randn(20, 8)
    with torch.no_grad():
        router.threshold[0] = 1e4  # expert 0 is never passed
    _, weights, index, out = router(x)
    _, batch, _, inference, inference_gates, _, agreement = _reference(router, x, [True] * 20)
    assert torch.allclose(_dense(index, weights, 6), torch.tensor(inference_gates), atol=1e-6)
    assert out.threshold_agreement == pytest.approx(agreement)
    # Routing one token alone gives the same gates as in the batch.
    for t in (0, 7, 19):
        _, w, i, _ = router(x[t : t + 1])
        assert torch.allclose(_dense(i, w, 6), _dense(index, weights, 6)[t : t + 1], atol=1e-7)
    # A token passing no threshold goes to its top-k experts by x W_g.
    with torch.no_grad():
        router.threshold.fill_(1e4)
    _, weights, index, _ = router(x)
    top = (x @ router.weight.T).topk(2, dim=-1).indices
    assert torch.equal(index.sort(-1).values, top.sort(-1).values)
    assert torch.allclose(weights.sum(-1), torch.ones(20))


@pytest.mark.parametrize("training", [True, False])
def test_padding_is_left_out_of_the_statistics(training):
    """SPEC §3/§5: Importance(X), Load(X) and the token counts are over the non-padding tokens, in evaluation too,
    where padding tokens are still routed (by the thresholds) but must not count."""
    router = _router().train(training)
    x = torch.randn(15, 8, generator=torch.Generator().manual_seed(5))
    valid = [t % 4 != 1 for t in range(15)]
    _, weights, index, out = router(x, torch.tensor(valid, dtype=torch.long))
    _, batch, batch_gates, inference, inference_gates, _, _ = _reference(router, x, valid)
    mask, gates = (batch, batch_gates) if training else (inference, inference_gates)
    real = [t for t in range(15) if valid[t]]
    assert torch.allclose(out.importance, torch.tensor([gates[t] for t in real]).sum(0), atol=1e-5)
    counts = torch.tensor([mask[t] for t in real]).float().sum(0)
    assert torch.equal(out.tokens_per_expert, counts) and torch.equal(out.load, counts)
    if not training:
        assert (_dense(index, weights, 6)[[t for t in range(15) if not valid[t]]] > 0).any()  # padding is routed
    # The same statistics as for the real tokens alone.
    alone = router(x[torch.tensor(valid)])[3]
    for field in ("importance", "load", "tokens_per_expert", "importance_loss", "load_loss", "threshold_agreement"):
        assert torch.allclose(getattr(out, field), getattr(alone, field), atol=1e-5), field


def test_a_logit_equal_to_its_threshold_does_not_pass_it():
    """SPEC §5: M_threshold(x, T)_i = 1 if (x W_g)_i > T_i, strictly."""
    router = BalancedRouter(1, 3, 1).eval()
    with torch.no_grad():
        router.weight.fill_(1.0)  # every expert's logit is x
        router.threshold.copy_(torch.tensor([1.0, 2.0, 0.5]))
    _, weights, index, _ = router(torch.tensor([[1.0], [2.0]]))
    rows = zip(index.tolist(), weights.tolist(), strict=True)
    chosen = [{e for e, w in zip(experts, gates, strict=True) if w > 0} for experts, gates in rows]
    assert chosen == [{2}, {0, 2}]


def test_balanced_config_and_initialisation():
    with pytest.raises(ValueError, match="`batchwise_loss_coef` must be a finite number >= 0, got -1.0"):
        tiny_config(router_type="balanced", batchwise_loss_coef=-1.0)
    model = MoEForCausalLM(tiny_config(router_type="balanced"))
    gate = model.model.layers[1].mlp.gate
    assert isinstance(gate, BalancedRouter)
    assert torch.count_nonzero(gate.weight) == gate.weight.numel()  # random: zero would tie every gate
    assert torch.count_nonzero(gate.threshold) == 0


def test_training_gives_every_expert_m_tokens_and_thresholds_learn_the_batchwise_choice():
    """300 steps of a tiny model; exactly m tokens per expert in every batch; then thresholds agree on most tokens."""
    torch.manual_seed(0)
    config = tiny_config(
        router_type="balanced",
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        expert_intermediate_size=16,
        moe_layers="all",
    )
    model = MoEForCausalLM(config)
    eval_batches = [torch.randint(1, 97, (8, 16), generator=torch.Generator().manual_seed(1000 + b)) for b in range(4)]

    def eval_agreement() -> float:
        model.eval()
        with torch.no_grad():
            values = [model(input_ids=ids).router_outputs[-1].threshold_agreement for ids in eval_batches]
        return float(sum(values)) / len(values)

    before = eval_agreement()
    steps = 300
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        ids = torch.randint(1, 97, (8, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[: step % 3, : step % 5] = 0  # some left padding, changing |X|
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        m = math.ceil(2 * int(mask.sum()) / 6)
        for router_output in out.router_outputs:
            assert torch.equal(router_output.tokens_per_expert, torch.full((6,), float(m))), step
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    after = eval_agreement()
    stats = model.pop_expert_statistics()
    # Measured (2 CPU cores, torch 2.13.0, one thread): 0.807 after 300 steps, 0.414 before training.
    assert after > 0.7, after
    assert before < 0.5, before
    assert 0 <= stats["layer_1/threshold_agreement"] <= 1
