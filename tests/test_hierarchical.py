"""Hierarchical MoE (SPEC §4): Importance_H and Load_H against brute-force and Monte-Carlo references, one group equal
to the flat router, a 4096-expert model on CPU; and the model-level checks of the flat router for every router type
(hierarchical, balanced, expert capacity): save/load, cached generation, left padding, gradient checkpointing, remote
code."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_moe import MoEConfig, MoEForCausalLM, TopKRouter
from modeling_moe.hierarchical_gating import HierarchicalRouter

from .conftest import run_remote_code_load, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and steadier on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Router settings the model-level checks run with (tiny_config's n=6, k=2 unless set).
ROUTER_CASES = {
    "hierarchical": dict(router_type="hierarchical", num_experts=12, num_expert_groups=4, num_groups_per_tok=2),
    "balanced": dict(router_type="balanced"),
    "capacity": dict(router_type="noisy_top_k", expert_capacity_factor=0.75),
    "hierarchical_capacity": dict(
        router_type="hierarchical",
        num_experts=12,
        num_expert_groups=3,
        num_groups_per_tok=2,
        expert_capacity_factor=1.0,
    ),
}


def router_model(case: str, seed: int = 0, **overrides) -> MoEForCausalLM:
    """A tiny model with the router of `ROUTER_CASES[case]` and random (as if trained) gate parameters, in eval mode."""
    torch.manual_seed(seed)
    model = MoEForCausalLM(tiny_config(**{**ROUTER_CASES[case], **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.gate." in name:
                param.normal_(0, 0.3)
    return model.eval()


def _ids(batch=2, length=10, seed=1, vocab=97):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _random_router(num_groups=3, group_size=4, k1=2, k2=2, hidden=8, seed=0) -> HierarchicalRouter:
    torch.manual_seed(seed)
    router = HierarchicalRouter(hidden, num_groups, group_size, k1, k2, importance_loss_coef=0.1, load_loss_coef=0.1)
    with torch.no_grad():
        for param in router.parameters():
            param.normal_(0, 0.5)
    return router


def _reference_statistics(router: HierarchicalRouter, x: torch.Tensor, mask: list[bool], seed: int):
    """Importance_H and Load_H of SPEC §4 token by token in float64, with the noise the router draws for `seed`."""
    a, b, k1, k2 = router.num_groups, router.group_size, router.groups_per_token, router.experts_per_group
    num_tokens = x.size(0)
    generator = torch.manual_seed(seed)  # the router draws the secondary noise, then the primary noise
    secondary_eps = torch.randn(num_tokens, a * b, generator=generator).double()
    primary_eps = torch.randn(num_tokens, a, generator=generator).double()
    x = x.double()

    def phi(z: float) -> float:
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    def gate(weight, noise_weight, eps, k):
        clean = (x @ weight.double().T).tolist()
        std = (torch.nn.functional.softplus(x @ noise_weight.double().T) + router.primary.noise_epsilon).tolist()
        rows = []
        for t in range(num_tokens):
            noisy = [c + e * s for c, e, s in zip(clean[t], eps[t].tolist(), std[t], strict=True)]
            order = sorted(range(len(noisy)), key=lambda i: -noisy[i])
            kept = order[:k]
            z = [math.exp(noisy[i] - noisy[kept[0]]) for i in kept]
            g = [0.0] * len(noisy)
            for i, v in zip(kept, z, strict=True):
                g[i] = v / sum(z)
            # P(x, i) = Phi((clean_i - kth largest of the noisy logits without i) / std_i), SPEC §3.
            p = []
            for i in range(len(noisy)):
                others = sorted((noisy[j] for j in range(len(noisy)) if j != i), reverse=True)
                p.append(phi((clean[t][i] - others[k - 1]) / std[t][i]))
            rows.append((g, p, set(kept)))
        return rows

    primary = gate(router.primary.weight, router.primary.noise_weight, primary_eps, k1)
    secondary_weight = router.secondary.weight.view(a, b, -1)
    secondary_noise = router.secondary.noise_weight.view(a, b, -1)
    groups = [
        gate(secondary_weight[i], secondary_noise[i], secondary_eps[:, i * b : (i + 1) * b], k2) for i in range(a)
    ]

    importance = [[0.0] * b for _ in range(a)]
    primary_load = [0.0] * a
    group_load = [[0.0] * b for _ in range(a)]
    group_tokens = [0] * a
    for t in range(num_tokens):
        if not mask[t]:
            continue
        g_primary, p_primary, kept = primary[t]
        for i in range(a):
            primary_load[i] += p_primary[i]
            if i in kept:  # x in X^(i)
                group_tokens[i] += 1
                g_i, p_i, _ = groups[i][t]
                for j in range(b):
                    importance[i][j] += g_primary[i] * g_i[j]
                    group_load[i][j] += p_i[j]
    load = [
        [primary_load[i] * group_load[i][j] / group_tokens[i] if group_tokens[i] else 0.0 for j in range(b)]
        for i in range(a)
    ]
    return torch.tensor(importance, dtype=torch.float64).reshape(-1), torch.tensor(load, dtype=torch.float64).reshape(
        -1
    )


@pytest.mark.parametrize("k1, k2", [(1, 1), (2, 2), (2, 3)])
def test_importance_and_load_match_brute_force_reference(k1, k2):
    router = _random_router(k1=k1, k2=k2).train()
    x = torch.randn(24, 8, generator=torch.Generator().manual_seed(3))
    mask = [t % 5 != 0 for t in range(24)]  # some padding tokens, left out of the statistics
    torch.manual_seed(11)
    _, weights, index, out = router(x, torch.tensor(mask, dtype=torch.long))
    importance, load = _reference_statistics(router, x, mask, seed=11)
    assert torch.allclose(out.importance.double(), importance, atol=1e-5)
    assert torch.allclose(out.load.double(), load, atol=1e-5)
    cv2 = lambda v: v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)  # noqa: E731
    assert torch.allclose(out.importance_loss.double(), 0.1 * cv2(importance), atol=1e-6)
    assert torch.allclose(out.load_loss.double(), 0.1 * cv2(load), atol=1e-6)
    # k1 * k2 distinct experts per token, inside the chosen groups, gate values summing to 1.
    assert weights.shape == index.shape == (24, k1 * k2)
    assert all(len(set(row)) == k1 * k2 for row in index.tolist())
    assert torch.allclose(weights.sum(-1), torch.ones(24), atol=1e-6)
    # Gradients reach both gates through the gate values and Load_H.
    (out.importance_loss + out.load_loss + weights.sum()).backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_empty_group_gives_zero_load_not_nan():
    router = _random_router(num_groups=4, k1=1).train()
    with torch.no_grad():
        router.primary.weight.zero_()
        router.primary.weight[0, 0] = 100.0  # every token goes to group 0
        router.primary.noise_weight.fill_(-30.0)  # noise scale ~ noise_epsilon
    x = torch.randn(16, 8).abs() + 0.1
    _, _, index, out = router.train()(x)
    assert (index // 4 == 0).all()
    assert torch.isfinite(out.load).all() and torch.isfinite(out.load_loss)
    assert (out.load[4:] < 1e-6).all()  # groups 1..3 receive nothing
    out.load_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in router.parameters())


def test_load_matches_monte_carlo_estimate():
    """Averaged over noise draws, Load_H (a smooth estimate) tracks the tokens each expert actually receives."""
    router = _random_router(num_groups=4, group_size=4, k1=2, k2=2, seed=5).train()
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    load_sum = torch.zeros(16)
    count_sum = torch.zeros(16)
    draws = 200
    with torch.no_grad():
        for _ in range(draws):
            _, _, _, out = router(x)
            load_sum += out.load
            count_sum += out.tokens_per_expert
    # About 30 tokens per expert and draw: the Monte-Carlo mean has ~1.3% standard error (measured max error 2.1%).
    relative_error = ((load_sum - count_sum).abs() / count_sum).max()
    assert relative_error < 0.05, (load_sum / draws, count_sum / draws)
    # And the estimate is not trivially the count: a single draw differs from it.
    assert not torch.allclose(out.load, out.tokens_per_expert)


def test_one_group_equals_flat_router():
    torch.manual_seed(0)
    flat = TopKRouter(8, 6, 2)
    with torch.no_grad():
        flat.weight.normal_(0, 0.5)
        flat.noise_weight.normal_(0, 0.5)
    hierarchical = HierarchicalRouter(8, num_groups=1, group_size=6, groups_per_token=1, experts_per_group=2)
    hierarchical.secondary.load_state_dict(flat.state_dict())
    with torch.no_grad():
        hierarchical.primary.weight.normal_(0, 0.5)  # a single group is always chosen with gate value 1
    x = torch.randn(20, 8)
    mask = torch.ones(20, dtype=torch.long)
    mask[:3] = 0
    for training in (True, False):
        flat.train(training)
        hierarchical.train(training)
        torch.manual_seed(3)
        flat_out = flat(x, mask)
        torch.manual_seed(3)
        hierarchical_out = hierarchical(x, mask)
        for expected, got in zip(flat_out[:3], hierarchical_out[:3], strict=True):
            assert torch.equal(expected, got)
        for field in ("importance", "tokens_per_expert", "importance_loss"):
            assert torch.equal(getattr(flat_out[3], field), getattr(hierarchical_out[3], field)), field
        for field in ("load", "load_loss"):  # |X| * Load / |X| may differ in the last bit
            assert torch.allclose(getattr(flat_out[3], field), getattr(hierarchical_out[3], field), rtol=1e-6), field


def test_routes_the_same_under_a_float64_default_dtype():
    """The gate runs in float32 whatever the dtypes around it (gating.py), also where `torch.set_default_dtype(float64)`
    makes new tensors float64, as the flat and balanced routers do: the hierarchical router's statistics too."""
    router = _random_router().train()
    x = torch.randn(16, 8)
    outputs = []
    for default_dtype in (torch.float32, torch.float64):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(default_dtype)
        try:
            torch.manual_seed(0)
            _, weights, index, out = router(x)
        finally:
            torch.set_default_dtype(previous)
        outputs.append((weights, index, out.importance, out.load, out.tokens_per_expert, out.aux_loss))
    for float32_default, float64_default in zip(*outputs, strict=True):
        assert torch.equal(float32_default, float64_default)


def test_one_group_model_equals_flat_model():
    flat = router_model("capacity", expert_capacity_factor=None)
    hierarchical = MoEForCausalLM(tiny_config(router_type="hierarchical", num_expert_groups=1)).eval()
    state = flat.state_dict()
    for key in [k for k in state if ".mlp.gate." in k]:
        state[key.replace(".mlp.gate.", ".mlp.gate.secondary.")] = state.pop(key)
    missing, unexpected = hierarchical.load_state_dict(state, strict=False)
    assert unexpected == [] and all(".gate.primary." in key for key in missing)
    ids = _ids()
    assert torch.equal(flat(input_ids=ids).logits, hierarchical(input_ids=ids).logits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=10, num_expert_groups=4), "`num_experts` \\(10\\) must be a multiple of `num_expert_groups`"),
        (dict(num_experts=12, num_expert_groups=4, num_groups_per_tok=5), "`num_groups_per_tok` must be between 1"),
        (dict(num_experts=12, num_expert_groups=4, num_groups_per_tok=0), "got 0"),
        (dict(num_experts=12, num_expert_groups=4, num_experts_per_tok=4), "must be at most the group size .* = 3"),
        (dict(num_expert_groups=0), "`num_expert_groups` must be a positive integer, got 0"),
    ],
)
def test_invalid_hierarchical_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(router_type="hierarchical", **overrides)


def test_groups_require_the_hierarchical_router():
    with pytest.raises(ValueError, match="`num_expert_groups` must be 1 unless router_type='hierarchical', got 2"):
        tiny_config(num_expert_groups=2)
    with pytest.raises(ValueError, match="`num_groups_per_tok` must be 1 unless router_type='hierarchical', got 2"):
        tiny_config(router_type="balanced", num_groups_per_tok=2)


def train_4096_experts(steps: int = 3) -> tuple[MoEForCausalLM, list[float]]:
    """A 4096-expert model (64 groups x 64, SPEC §4) with tiny sizes, trained `steps` steps on 2 x 32 tokens."""
    torch.manual_seed(0)
    config = tiny_config(
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        num_experts=4096,
        router_type="hierarchical",
        num_expert_groups=64,
        num_groups_per_tok=2,
        num_experts_per_tok=2,
        expert_intermediate_size=8,
    )
    model = MoEForCausalLM(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = _ids(batch=2, length=32, seed=0)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    return model, losses


def test_4096_experts_build_forward_backward_and_train():
    model, losses = train_4096_experts(steps=4)
    experts = model.model.layers[1].mlp.experts
    assert experts.up_proj.shape == (4096, 8, 16)
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    out = model.eval()(input_ids=_ids(batch=1, length=6))
    assert out.router_outputs[0].tokens_per_expert.sum() == 6 * 2 * 2  # k1 * k2 experts per token
    stats = model.pop_expert_statistics()
    assert math.isfinite(stats["layer_1/cv_load"])


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _config_file(name: str) -> MoEConfig:
    fields = json.loads((CONFIGS / name).read_text())
    assert fields.pop("model_type") == MoEConfig.model_type
    return MoEConfig(**fields)


def test_hierarchical_configs():
    # The paper's MoE-4096-h scale (SPEC §4): 64 groups x 64 experts of ~1M parameters, 2 kept at each level.
    config = _config_file("hierarchical_4096.json")
    assert (config.num_experts, config.num_expert_groups, config.experts_per_token) == (4096, 64, 4)
    with torch.device("meta"):  # 4.3B parameters: count them without allocating memory
        model = MoEForCausalLM(config)
    expert_parameters = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert expert_parameters == 4096 * 2 * 512 * 1024
    # The small one (16 x 16) trains on a CPU.
    config = _config_file("hierarchical_small.json")
    assert (config.num_experts, config.num_expert_groups, config.experts_per_token) == (256, 16, 4)
    torch.manual_seed(0)
    model = MoEForCausalLM(config).train()
    ids = _ids(batch=2, length=16, vocab=config.vocab_size)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[1].mlp.gate.secondary.weight.grad.abs().sum() > 0


# ----- Model-level checks for every router type (the flat router's are in test_model.py). -----


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_types_save_load_generate_and_padding(case, tmp_path):
    model = router_model(case)
    ids = _ids()
    # Save / load: bitwise identical logits.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    # Greedy generation with and without the KV cache.
    prompt = _ids(batch=1, length=5)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(
        model.generate(prompt, use_cache=True, **settings), model.generate(prompt, use_cache=False, **settings)
    )
    # One recorded router_logits per MoE layer (the hierarchical router's inner gates are not recorded).
    logits = model(input_ids=ids, output_router_logits=True).router_logits
    assert len(logits) == 1 and logits[0].shape == (ids.numel(), model.config.num_experts)
    # Left padding: each example of a padded batch as alone.
    first, second = _ids(batch=1, length=8, seed=3), _ids(batch=1, length=5, seed=4)
    batch = torch.cat([first, torch.cat([torch.zeros(1, 3, dtype=torch.long), second], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model(input_ids=batch, attention_mask=mask)
    assert torch.allclose(out.logits[0], model(input_ids=first).logits[0], atol=1e-5)
    assert torch.allclose(out.logits[1, 3:], model(input_ids=second).logits[0], atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_types_gradient_checkpointing_gives_the_same_gradients(case, use_reentrant):
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    gradients = []
    for checkpointing in (False, True):
        model = router_model(case, num_hidden_layers=3, moe_layers="all").train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
        torch.manual_seed(42)  # the same gate noise in both runs (checkpointing replays the RNG state)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
    for name, grad in gradients[0].items():
        assert torch.allclose(grad, gradients[1][name], atol=1e-6), name


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("case", ["hierarchical", "balanced", "capacity"])
def test_router_types_work_with_every_experts_implementation(case, implementation, tmp_path):
    """The routers' `(tokens, K)` outputs (zero-weight slots, zeroed dropped slots included) suit every kernel."""
    router_model(case).save_pretrained(tmp_path)
    ids = _ids(batch=3, length=12)
    outputs, gradients = {}, {}
    for name in ("eager", implementation):
        loaded = MoEForCausalLM.from_pretrained(tmp_path, experts_implementation=name).train()
        torch.manual_seed(7)
        out = loaded(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs[name] = out.logits
        gradients[name] = {n: p.grad for n, p in loaded.named_parameters() if p.grad is not None}
    assert torch.allclose(outputs["eager"], outputs[implementation], atol=1e-5)
    for name, grad in gradients["eager"].items():
        assert torch.allclose(grad, gradients[implementation][name], atol=1e-5), name


def test_router_types_load_as_remote_code_without_the_package(tmp_path):
    ids = _ids()
    folders, expected = [], []
    for case in ROUTER_CASES:
        model = router_model(case)
        model.save_pretrained(tmp_path / case)
        for source in ("hierarchical_gating.py", "balanced_gating.py", "gating.py"):
            assert (tmp_path / case / source).exists(), source
        folders.append(str(tmp_path / case))
        expected.append(model(input_ids=ids).logits)
    remote_logits = run_remote_code_load(folders, ids, tmp_path)
    for folder, remote, logits in zip(folders, remote_logits, expected, strict=True):
        assert torch.equal(remote, logits), folder
