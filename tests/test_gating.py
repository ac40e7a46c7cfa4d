"""The noisy top-k gate and the balancing losses against SPEC §2-§3, checked by brute force and Monte-Carlo."""

import itertools
import math

import numpy as np
import pytest
import torch

from modeling_moe.gating import TopKRouter, cv_squared, kth_excluding, load_probability


def brute_force_kth_excluding(values: torch.Tensor, k: int) -> torch.Tensor:
    """k-th largest of each row with entry i removed, by sorting the remaining entries."""
    num_tokens, num_experts = values.shape
    out = torch.full_like(values, float("-inf"))
    for t, i in itertools.product(range(num_tokens), range(num_experts)):
        rest = torch.cat([values[t, :i], values[t, i + 1 :]]).sort(descending=True).values
        if k <= rest.numel():
            out[t, i] = rest[k - 1]
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_kth_excluding_is_exact_with_ties(k):
    generator = torch.Generator().manual_seed(k)
    # Small integers: most rows have ties, inside and across the top-k boundary.
    values = torch.randint(-2, 3, (200, 5), generator=generator).float()
    assert torch.equal(kth_excluding(values, k), brute_force_kth_excluding(values, k))


def test_kth_excluding_without_ties_matches_brute_force():
    values = torch.randn(50, 7, generator=torch.Generator().manual_seed(0))
    for k in range(1, 8):
        assert torch.equal(kth_excluding(values, k), brute_force_kth_excluding(values, k))


def test_kth_excluding_rejects_bad_k():
    with pytest.raises(ValueError, match="`k` must be between 1 and the number of experts \\(4\\), got 5"):
        kth_excluding(torch.zeros(2, 4), 5)


def test_cv_squared_follows_spec():
    rng = np.random.default_rng(0)
    for values in [rng.random(16), rng.random(3) * 100, np.zeros(4), np.ones(5)]:
        expected = values.var() / (values.mean() ** 2 + 1e-10)  # population variance, SPEC §3
        assert cv_squared(torch.tensor(values)).item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert cv_squared(torch.tensor([2.0])).item() == 0.0  # a single expert is perfectly balanced


def _random_gate_inputs(num_tokens: int, num_experts: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randn(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    noise_std = 0.3 + torch.rand(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    return clean, noise_std, generator


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_probability_matches_monte_carlo_conditional(k):
    """P(x, i) is the chance that i stays in the top k when only its own noise is redrawn (SPEC §3)."""
    num_tokens, num_experts, samples = 6, 6, 40_000
    clean, noise_std, generator = _random_gate_inputs(num_tokens, num_experts, seed=k)
    noisy = clean + torch.randn(clean.shape, generator=generator, dtype=torch.float64) * noise_std
    estimate = load_probability(clean, noisy, noise_std, k)

    redrawn_noise = torch.randn(samples, num_tokens, num_experts, generator=generator, dtype=torch.float64)
    monte_carlo = torch.empty_like(estimate)
    for i in range(num_experts):
        trials = noisy.expand(samples, -1, -1).clone()
        trials[..., i] = clean[:, i] + redrawn_noise[..., i] * noise_std[:, i]
        in_top_k = (trials.topk(k, dim=-1).indices == i).any(dim=-1)  # (samples, tokens)
        monte_carlo[:, i] = in_top_k.double().mean(dim=0)
    assert (estimate - monte_carlo).abs().max().item() < 0.01


@pytest.mark.parametrize("k", [1, 3])
def test_load_probability_averages_to_probability_of_top_k(k):
    """Averaged over the other experts' noise, P(x, i) is P(expert i lands in the top k) of the noisy gate."""
    num_tokens, num_experts, samples = 5, 6, 20_000
    clean, noise_std, generator = _random_gate_inputs(num_tokens, num_experts, seed=10 + k)
    noisy = clean + torch.randn(samples, num_tokens, num_experts, generator=generator, dtype=torch.float64) * noise_std
    estimate = load_probability(clean.expand_as(noisy), noisy, noise_std.expand_as(noisy), k).mean(dim=0)
    selected = torch.zeros_like(noisy).scatter(-1, noisy.topk(k, dim=-1).indices, 1.0)
    monte_carlo = selected.mean(dim=0)
    assert (estimate - monte_carlo).abs().max().item() < 0.01


def _router(num_experts=8, k=2, hidden=16, noisy=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    router = TopKRouter(hidden, num_experts, k, noisy=noisy, **kwargs)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        if noisy:
            router.noise_weight.normal_(0, 0.5)
    return router


def test_router_load_is_sum_of_load_probability_and_gates_are_softmax_of_kept_noisy_logits():
    router = _router().train()
    x = torch.randn(40, 16)
    torch.manual_seed(123)
    clean, weights, index, out = router(x)
    # Replay the same noise by hand (SPEC §2).
    torch.manual_seed(123)
    clean_ref = x @ router.weight.T
    noise_std = torch.nn.functional.softplus(x @ router.noise_weight.T) + router.noise_epsilon
    noisy = clean_ref + torch.randn_like(clean_ref) * noise_std
    masked = torch.full_like(noisy, float("-inf")).scatter(1, noisy.topk(2, dim=-1).indices, noisy.topk(2).values)
    gates = masked.softmax(dim=-1)
    assert torch.allclose(clean, clean_ref, atol=1e-6)
    dense_gates = torch.zeros_like(gates).scatter(1, index, weights)
    assert torch.allclose(dense_gates, gates, atol=1e-6)
    assert torch.allclose(out.importance, gates.sum(0), atol=1e-5)
    load = load_probability(clean_ref, noisy, noise_std, 2).sum(0)
    assert torch.allclose(out.load, load, atol=1e-5)
    assert torch.allclose(out.importance_loss, 0.1 * cv_squared(gates.sum(0)), atol=1e-6)
    assert torch.allclose(out.load_loss, 0.1 * cv_squared(load), atol=1e-6)


def test_gradients_reach_both_gate_matrices_and_every_used_expert():
    from modeling_moe.modeling_moe import MoESparseBlock

    from .conftest import tiny_config

    config = tiny_config(num_experts=6, num_experts_per_tok=2, moe_layers="all")
    block = MoESparseBlock(config).train()
    torch.nn.init.normal_(block.experts.up_proj, std=0.1)
    torch.nn.init.normal_(block.experts.down_proj, std=0.1)
    # Gates start at zero (SPEC §2): routing is noise-only, yet both gate matrices must get gradients.
    assert torch.count_nonzero(block.gate.weight) == 0 and torch.count_nonzero(block.gate.noise_weight) == 0
    x = torch.randn(2, 12, config.hidden_size)
    output, router_output = block(x)
    (output.square().mean() + router_output.aux_loss).backward()
    assert block.gate.weight.grad.abs().sum() > 0
    assert block.gate.noise_weight.grad.abs().sum() > 0
    used = router_output.tokens_per_expert > 0
    assert used.sum() >= 2
    per_expert_grad = block.experts.up_proj.grad.abs().sum(dim=(1, 2))
    assert bool((per_expert_grad[used] > 0).all())
    assert bool((block.experts.down_proj.grad.abs().sum(dim=(1, 2))[used] > 0).all())


def test_load_loss_alone_gives_gate_gradients():
    router = _router(importance_loss_coef=0.0, load_loss_coef=1.0).train()
    router(torch.randn(30, 16))[3].aux_loss.backward()
    assert router.weight.grad.abs().sum() > 0 and router.noise_weight.grad.abs().sum() > 0


def _reference_balancing_losses(router: TopKRouter, x: torch.Tensor, mask: torch.Tensor, seed: int):
    """L_importance and L_load of SPEC §2-§3 in float64, written from the formulas, with the noise the router draws.

    Returns `(importance_loss, load_loss, top_k_index, (W_g, W_noise))`: float64 leaves of the two gate matrices, so
    that autograd gives the reference gradients. Nothing from `modeling_moe.gating` is used but the router's weights.
    """
    weight = router.weight.detach().double().requires_grad_()  # W_g^T
    noise_weight = router.noise_weight.detach().double().requires_grad_()  # W_noise^T
    num_tokens, num_experts, k = x.size(0), router.num_experts, router.top_k
    eps = torch.randn(num_tokens, num_experts, generator=torch.manual_seed(seed)).double()  # the router's draw
    x = x.double()
    clean = x @ weight.T
    sigma = torch.log1p(torch.exp(x @ noise_weight.T)) + router.noise_epsilon  # softplus + the floor of SPEC §2
    noisy = clean + eps * sigma  # H(x)
    sorted_noisy, order = noisy.sort(dim=-1, descending=True)
    rank = order.argsort(dim=-1)  # rank[t, i]: position of expert i in row t, 0 = largest
    in_top_k = rank < k
    # G(x) = softmax(KeepTopK(H(x), k)).
    gates = torch.where(in_top_k, noisy, torch.tensor(float("-inf"), dtype=noisy.dtype)).softmax(dim=-1)
    # kth_excluding(H(x), k, i): the (k+1)-th largest for an expert inside the top k, the k-th largest otherwise.
    threshold = torch.where(in_top_k, sorted_noisy[:, k : k + 1], sorted_noisy[:, k - 1 : k])
    z = (clean - threshold) / sigma
    probability = 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # Phi
    keep = mask.double().unsqueeze(-1)

    def cv_squared_reference(values):
        mean = values.mean()
        return ((values - mean) ** 2).mean() / (mean**2 + 1e-10)

    importance_loss = router.importance_loss_coef * cv_squared_reference((gates * keep).sum(0))
    load_loss = router.load_loss_coef * cv_squared_reference((probability * keep).sum(0))
    return importance_loss, load_loss, order[:, :k], (weight, noise_weight)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balancing_loss_gradients_match_float64_reference(k):
    """The W_g and W_noise gradients of L_load and L_importance equal autograd through SPEC §2-§3 in float64.

    The gradient of L_load flows through the clean logits, the noise scale (the divisor of Phi) and the threshold
    kth_excluding(H(x), k, i), which depends on both gate matrices through H(x); dropping any of these paths changes
    the gradients by far more than the float32 tolerance.
    """
    # A noise floor other than the default 1e-2: the reference takes it from the router, as the router must.
    router = _router(num_experts=8, k=k, noise_epsilon=0.1).train()
    x = torch.randn(24, 16, generator=torch.Generator().manual_seed(k))
    mask = torch.ones(24)
    mask[[3, 10, 17]] = 0.0  # padding takes no part in either loss
    seed = 100 + k
    torch.manual_seed(seed)
    _, _, top_k_index, out = router(x, mask)
    importance_ref, load_ref, top_k_index_ref, leaves = _reference_balancing_losses(router, x, mask, seed)
    assert torch.equal(top_k_index, top_k_index_ref)  # same noise, same routing
    for name, loss, loss_ref in [
        ("importance", out.importance_loss, importance_ref),
        ("load", out.load_loss, load_ref),
    ]:
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5), name
        grads = torch.autograd.grad(loss, [router.weight, router.noise_weight], retain_graph=True)
        grads_ref = torch.autograd.grad(loss_ref, leaves, retain_graph=True)
        for param, grad, grad_ref in zip(["W_g", "W_noise"], grads, grads_ref, strict=True):
            error = (grad.double() - grad_ref).abs().max().item()
            scale = grad_ref.abs().max().item()
            if name == "importance" and k == 1:  # a single kept expert always has gate 1: no gradient
                assert scale == 0.0 and error == 0.0
                continue
            assert scale > 1e-3, (name, param)  # a gradient worth comparing
            assert error <= 1e-4 * scale, (name, param, error, scale)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_probability_passes_gradcheck(k):
    """load_probability is differentiable in all three inputs, the threshold included (float64, no ties)."""
    clean, noise_std, generator = _random_gate_inputs(5, 6, seed=20 + k)
    noisy = clean + torch.randn(clean.shape, generator=generator, dtype=torch.float64) * noise_std
    inputs = tuple(t.clone().requires_grad_() for t in (clean, noisy, noise_std))
    assert torch.autograd.gradcheck(lambda c, h, s: load_probability(c, h, s, k), inputs)


@pytest.mark.parametrize("noisy", [True, False])
def test_with_one_kept_expert_only_the_noisy_load_loss_trains_the_gate(noisy):
    """k = 1 (configuration_moe.py, README): the one kept gate value is the softmax of one logit, always 1, so neither
    a loss downstream of the gate values (the model's) nor L_importance reaches W_g; the noisy gate's smooth L_load
    does, the softmax gate's token count does not. With k = 2 the gate values carry the model's gradient."""
    x = torch.randn(16, 16)

    def gate_gradient(router, loss):
        if not loss.requires_grad:
            return torch.zeros_like(router.weight)
        (grad,) = torch.autograd.grad(loss, router.weight, retain_graph=True, allow_unused=True)
        return torch.zeros_like(router.weight) if grad is None else grad

    for k in (1, 2):
        router = _router(k=k, noisy=noisy).train()
        _, weights, _, out = router(x)
        downstream = (weights * torch.randn_like(weights)).sum()
        model_grad, importance_grad, load_grad = (
            gate_gradient(router, loss) for loss in (downstream, out.importance_loss, out.load_loss)
        )
        if k == 1:
            assert (model_grad == 0).all() and (importance_grad == 0).all()
            assert (load_grad.abs().max() > 0) == noisy
        else:
            assert model_grad.abs().max() > 0 and importance_grad.abs().max() > 0


def test_evaluation_is_deterministic_and_training_is_noisy():
    router = _router()
    x = torch.randn(64, 16)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first[2], second[2]) and torch.equal(first[1], second[1])
    # Without noise, Load is the plain token count (SPEC §3).
    assert torch.equal(first[3].load, first[3].tokens_per_expert)
    router.train()
    assert not torch.equal(router(x)[2], router(x)[2])


def test_padding_is_left_out_of_importance_and_load():
    router = _router().eval()
    x = torch.randn(10, 16)
    mask = torch.tensor([1, 1, 1, 0, 0, 1, 1, 0, 1, 1])
    masked = router(x, mask)[3]
    only_real = router(x[mask.bool()])[3]
    assert torch.allclose(masked.importance, only_real.importance, atol=1e-6)
    assert torch.equal(masked.load, only_real.load)
    router.train()
    torch.manual_seed(0)
    masked = router(x, mask)[3]
    torch.manual_seed(0)
    _, weights, index, unmasked = router(x)
    assert masked.tokens_per_expert.sum() == 2 * 7 and unmasked.tokens_per_expert.sum() == 2 * 10
    # In training too (same noise): Importance sums the real tokens' gates, Load their smooth P(x, i) (SPEC §3).
    torch.manual_seed(0)
    clean, noisy, noise_std = router.gate_logits(x)
    real = mask.bool()
    gates = torch.zeros(10, 8).scatter(1, index, weights)
    assert torch.allclose(masked.importance, gates[real].sum(0), atol=1e-6)
    assert torch.allclose(masked.load, load_probability(clean, noisy, noise_std, 2)[real].sum(0), atol=1e-6)
    assert not torch.allclose(masked.load, unmasked.load, atol=1e-3)


@pytest.mark.parametrize(
    "case",
    ["eval_no_noise", "single_token", "all_padding", "k_equals_n", "float16", "bfloat16", "softmax_top_k"],
)
def test_edge_cases_stay_finite(case):
    num_experts, k, dtype, noisy, train = 8, 2, torch.float32, True, True
    x = torch.randn(12, 16)
    mask = None
    if case == "eval_no_noise":
        train = False
    elif case == "single_token":
        x = x[:1]
    elif case == "all_padding":
        mask = torch.zeros(12)
    elif case == "k_equals_n":
        k = num_experts
    elif case in ("float16", "bfloat16"):
        dtype = getattr(torch, case)
    elif case == "softmax_top_k":
        noisy = False
    router = _router(num_experts=num_experts, k=k, noisy=noisy).to(dtype).train(train)
    x = x.to(dtype).requires_grad_()
    clean, weights, index, out = router(x, mask)
    assert clean.dtype == torch.float32  # the gate runs in float32 whatever the model dtype
    for tensor in (weights, out.importance, out.load, out.importance_loss, out.load_loss):
        assert torch.isfinite(tensor).all(), case
    assert torch.allclose(weights.sum(-1), torch.ones(x.shape[0]), atol=1e-5)
    (out.aux_loss + weights.sum()).backward()
    assert torch.isfinite(x.grad).all()
    for name, param in router.named_parameters():
        if param.grad is None:  # no noise outside training: W_noise takes no part
            assert name == "noise_weight" and not train
            continue
        assert torch.isfinite(param.grad).all(), case
    if case == "all_padding":
        assert out.aux_loss.item() == 0.0
    if case == "k_equals_n":
        assert torch.equal(out.load, torch.full((num_experts,), float(x.shape[0])))


def test_a_tiny_noise_floor_keeps_the_load_gradients_finite():
    """`noise_epsilon` only has to be > 0. With a floor of 1e-30 and softplus(x W_noise) underflowing to 0, sigma^2
    underflows in the backward of Phi's argument `(clean - threshold) / sigma`: Phi's zero derivative there must not
    become 0 * inf = NaN in the gate gradients. The load is unchanged (here a step function of the logit gaps)."""
    router = _router(noise_epsilon=1e-30).train()
    with torch.no_grad():
        router.noise_weight.fill_(-1e3)
    x = (torch.randn(12, 16).abs() + 0.1).requires_grad_()  # x W_noise < -1e3: softplus is 0
    torch.manual_seed(0)
    clean, noisy, noise_std = router.gate_logits(x)
    assert torch.equal(noise_std, torch.full_like(noise_std, 1e-30))
    torch.manual_seed(0)
    out = router(x)[3]
    assert torch.equal(out.load, torch.special.ndtr((clean - kth_excluding(noisy, 2)) / noise_std).sum(0))
    out.load_loss.backward()
    for grad in (x.grad, router.weight.grad, router.noise_weight.grad):
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("router", ["noisy_top_k", "softmax_top_k", "hierarchical", "balanced"])
@pytest.mark.parametrize("training", [True, False])
def test_gate_stays_float32_under_autocast(router, training):
    """`Trainer(bf16=True)` runs the forward under `torch.autocast`, which runs `F.linear` in bf16 whatever its inputs'
    dtype. The gate stays float32 there (module docstring): the same logits, routing and losses as without autocast.
    (In bf16 the hierarchical router's `scatter` of its gate values into float32 failed even on the CPU, and on CUDA,
    whose autocast also runs `softmax` in float32, every router's did.)"""
    from modeling_moe.balanced_gating import BalancedRouter
    from modeling_moe.hierarchical_gating import HierarchicalRouter

    torch.manual_seed(0)
    module = {
        "noisy_top_k": lambda: TopKRouter(16, 8, 2),
        "softmax_top_k": lambda: TopKRouter(16, 8, 2, noisy=False),
        "hierarchical": lambda: HierarchicalRouter(
            16, num_groups=2, group_size=4, groups_per_token=1, experts_per_group=2
        ),
        "balanced": lambda: BalancedRouter(16, 8, 2),
    }[router]().train(training)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_()
    x = torch.randn(10, 16)
    outputs = []
    for autocast in (False, True):
        torch.manual_seed(1)  # the same noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, weights, index, router_output = module(x)
        outputs.append((logits, weights, index, router_output.aux_loss))
    for plain, autocast in zip(*outputs, strict=True):
        assert autocast.dtype == plain.dtype and torch.equal(autocast, plain)
    assert outputs[1][0].dtype == torch.float32 and outputs[1][1].dtype == torch.float32
