"""MoEForCausalLM behaves like a Transformers causal LM: saving, remote code, generation, attention and experts
implementations, padding, gradient checkpointing, input validation."""

import json
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from modeling_moe import MoEConfig, MoEForCausalLM
from modeling_moe.modeling_moe import CACHE_NAME, MoEExperts, MoEGatedExperts, MoEMLP, MoERotaryEmbedding

from .conftest import run_remote_code_load, tiny_config, tiny_olmoe


def _model(seed: int = 0, **overrides) -> MoEForCausalLM:
    torch.manual_seed(seed)
    model = MoEForCausalLM(tiny_config(**overrides))
    # Give the gates non-zero weights so routing depends on the input, as in a trained model.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") or name.endswith("gate.noise_weight"):
                param.normal_(0, 0.3)
    return model.eval()


def _ids(batch=2, length=10, seed=1, vocab=97):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_registration_and_structure():
    from transformers import AutoConfig

    config = tiny_config(num_hidden_layers=4, moe_layers=2)
    assert isinstance(AutoConfig.for_model("sparsely_gated_moe"), MoEConfig)
    model = MoEForCausalLM(config)
    assert [layer.is_moe_layer for layer in model.model.layers] == [False, True, False, True]
    assert isinstance(model.model.layers[0].mlp, MoEMLP)
    assert isinstance(model.model.layers[1].mlp.experts, MoEExperts)
    assert model.model.layers[1].mlp.experts.up_proj.shape == (6, 24, 32)  # fused (n, expert hidden, hidden)
    gated = MoEForCausalLM(tiny_config(expert_activation="swiglu"))
    assert isinstance(gated.model.layers[1].mlp.experts, MoEGatedExperts)
    assert gated.model.layers[1].mlp.experts.gate_up_proj.shape == (6, 48, 32)
    # SPEC §2: both gate matrices start at zero; every other parameter is initialised (no NaN, not all zero).
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if "mlp.gate." in name:
            assert torch.count_nonzero(param) == 0, name
        else:
            assert torch.count_nonzero(param) > 0, name


def test_all_moe_layers_and_every_nth():
    assert tiny_config(num_hidden_layers=6, moe_layers="all").moe_layer_indices == [0, 1, 2, 3, 4, 5]
    assert tiny_config(num_hidden_layers=6, moe_layers=3).moe_layer_indices == [2, 5]
    assert tiny_config(num_hidden_layers=6, moe_layers=[4, 0]).moe_layer_indices == [0, 4]
    assert tiny_config(num_hidden_layers=6, moe_layers=6).moe_layer_indices == [5]  # the period may be every layer
    assert tiny_config(num_hidden_layers=6, moe_layers=1).moe_layer_indices == [0, 1, 2, 3, 4, 5]


def test_boundary_config_values_are_accepted():
    assert tiny_config(attention_dropout=1.0).attention_dropout == 1.0
    assert tiny_config(head_dim=2).head_dim == 2
    hierarchical = tiny_config(router_type="hierarchical", num_expert_groups=3, num_experts_per_tok=2)
    assert hierarchical.experts_per_token == 2  # k = the group size (6 experts in 3 groups of 2)
    assert tiny_config(expert_capacity_factor=1e-3).expert_capacity_factor == 1e-3
    assert tiny_config(num_attention_heads=8, num_key_value_heads=2).head_dim == 4  # hidden_size // attention heads


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts_per_tok=7), "`num_experts_per_tok` must be between 1 and `num_experts` \\(6\\), got 7"),
        (dict(num_experts_per_tok=0), "`num_experts_per_tok` must be between 1 and `num_experts` \\(6\\), got 0"),
        (dict(importance_loss_coef=-0.1), "`importance_loss_coef` must be a finite number >= 0, got -0.1"),
        (dict(load_loss_coef=-1.0), "`load_loss_coef` must be a finite number >= 0, got -1.0"),
        (dict(load_loss_coef=float("nan")), "`load_loss_coef` must be a finite number >= 0, got nan"),
        (dict(rms_norm_eps=float("nan")), "`rms_norm_eps` must be a finite number > 0, got nan"),
        (dict(initializer_range=-0.02), "`initializer_range` must be a finite number >= 0, got -0.02"),
        (dict(initializer_range=float("inf")), "`initializer_range` must be a finite number >= 0, got inf"),
        (dict(attention_dropout=1.5), "`attention_dropout` must be a probability in \\[0, 1\\], got 1.5"),
        (dict(hidden_size=30), "`hidden_size` \\(30\\) must be divisible by `num_attention_heads` \\(4\\)"),
        (dict(hidden_size=36), "head size hidden_size // num_attention_heads = 9 .* must be even"),
        (
            dict(num_key_value_heads=3),
            "`num_attention_heads` \\(4\\) must be divisible by `num_key_value_heads` \\(3\\)",
        ),
        (dict(router_type="switch"), "`router_type` must be one of .*, got 'switch'"),
        (dict(expert_activation="gelu"), "`expert_activation` must be one of .*, got 'gelu'"),
        (dict(moe_layers=[2]), "`moe_layers` entry 2 is not a layer index in \\[0, 2\\)"),
        (dict(moe_layers=[-1]), "`moe_layers` entry -1 is not a layer index"),
        (
            dict(moe_layers=0),
            "`moe_layers` as an int is the MoE period .* between 1 and num_hidden_layers \\(2\\), got 0",
        ),
        (
            dict(moe_layers=3),
            "`moe_layers` as an int is the MoE period .* between 1 and num_hidden_layers \\(2\\), got 3",
        ),
        (dict(moe_layers="some"), "`moe_layers` must be 'all', a positive int or a list of layer indices, got 'some'"),
        (dict(num_experts=0), "`num_experts` must be a positive integer, got 0"),
        (dict(num_key_value_heads=0), "`num_key_value_heads` must be a positive integer, got 0"),
        (dict(moe_layers=[1, 1]), "`moe_layers` has repeated layer indices: \\[1, 1\\]"),
        (dict(head_dim=3), "`head_dim` must be a positive even integer \\(RoPE\\), got 3"),
        (dict(expert_capacity_factor=0.0), "`expert_capacity_factor` must be a finite number > 0 or None, got 0.0"),
        (dict(noise_epsilon=-1e-3), "`noise_epsilon` must be a finite number > 0, got -0.001"),
        (dict(noise_epsilon=0.0), "`noise_epsilon` must be a finite number > 0, got 0.0"),
    ],
)
def test_invalid_config_values_raise_value_error_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=8.0), "Field 'num_experts' expected int, got float \\(value: 8.0\\)"),
        (dict(num_experts="8"), "Field 'num_experts' expected int, got str"),
        (dict(num_experts_per_tok=True), "Field 'num_experts_per_tok' expected int, got bool"),
        (dict(num_expert_groups=2.0), "Field 'num_expert_groups' expected int, got float"),
        (dict(expert_capacity_factor="1.0"), "Field 'expert_capacity_factor' with value '1.0' doesn't match"),
        (dict(output_router_logits="no"), "Field 'output_router_logits' expected bool, got str"),
        (dict(expert_recompute_activations="yes"), "Field 'expert_recompute_activations' expected bool, got str"),
        (dict(moe_layers=None), "Field 'moe_layers' with value None doesn't match"),
        (dict(moe_layers=1.5), "Field 'moe_layers' with value 1.5 doesn't match"),
    ],
)
def test_values_of_the_wrong_type_raise_naming_the_field(overrides, message):
    # As for built-in configs: `@strict` checks each field's annotated type on assignment.
    with pytest.raises(StrictDataclassFieldValidationError, match=message):
        tiny_config(**overrides)
    config = tiny_config()
    name, value = next(iter(overrides.items()))
    with pytest.raises(StrictDataclassFieldValidationError, match=f"Field '{name}'"):
        setattr(config, name, value)


def test_values_changed_after_construction_are_checked_before_saving(tmp_path):
    # As for built-in configs (`@strict`): `validate()` and `save_pretrained` run the same checks as construction,
    # so a bad value set afterwards is not written into a config.json that would then fail to load.
    config = tiny_config()
    config.num_experts_per_tok = 9
    with pytest.raises(StrictDataclassClassValidationError, match="`num_experts_per_tok` must be between 1"):
        config.validate()
    with pytest.raises(StrictDataclassClassValidationError, match="`num_experts_per_tok` must be between 1"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_invalid_inputs_raise_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="token id 97, outside the vocabulary \\[0, 97\\)"):
        model(input_ids=torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -3"):
        model(input_ids=torch.tensor([[1, -3]]))
    with pytest.raises(TypeError, match="`input_ids` must be an integer"):
        model(input_ids=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="`input_ids` must have shape \\(batch_size, sequence_length\\), got \\(3,\\)"):
        model(input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="`inputs_embeds` must have shape \\(batch_size, sequence_length, 32\\)"):
        model(inputs_embeds=torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="exactly one of `input_ids` or `inputs_embeds`"):
        model(input_ids=torch.tensor([[1]]), inputs_embeds=torch.randn(1, 1, 32))
    with pytest.raises(ValueError, match="`labels` must have shape .* = \\(1, 3\\) of `input_ids`, got \\(1, 2\\)"):
        model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="`labels` must have shape .* = \\(1, 3\\) of `inputs_embeds`, got \\(1, 2\\)"):
        model(inputs_embeds=torch.randn(1, 3, 32), labels=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="`attention_mask` has batch size 2 but the inputs have batch size 1"):
        model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="`attention_mask` has length 2, shorter than the 3 new tokens"):
        model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2, dtype=torch.long))


def test_loss_includes_balancing_losses_whatever_output_router_logits_says():
    model = _model().train()
    ids = _ids()
    for output_router_logits in (False, True):
        torch.manual_seed(0)
        out = model(input_ids=ids, labels=ids, output_router_logits=output_router_logits)
        assert out.aux_loss > 0
        assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
        assert torch.allclose(out.aux_loss, out.importance_loss + out.load_loss)
        assert len(out.router_outputs) == 1
        if output_router_logits:
            assert out.router_logits[0].shape == (ids.numel(), 6)
    # The balancing losses follow the coefficients.
    torch.manual_seed(0)
    zero = MoEForCausalLM(tiny_config(importance_loss_coef=0.0, load_loss_coef=0.0)).train()(input_ids=ids, labels=ids)
    assert zero.aux_loss == 0 and torch.allclose(zero.loss, zero.lm_loss)


ROUTER_OVERRIDES = {
    "noisy_top_k": {},
    "hierarchical": dict(router_type="hierarchical", num_expert_groups=3, num_groups_per_tok=2),
    "balanced": dict(router_type="balanced", batchwise_loss_coef=0.0),
}


def _cv(values: list[float]) -> float:
    """SPEC §3: CV = std / mean over the experts (population std; the 1e-10 of the reference numerics omitted)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean


@pytest.mark.parametrize("router_type", list(ROUTER_OVERRIDES))
@pytest.mark.parametrize("training", [True, False])
def test_each_balancing_loss_follows_its_own_coefficient_and_statistic(router_type, training):
    """SPEC §3: L_importance = w_importance CV(Importance)^2 and L_load = w_load CV(Load)^2, with two different weights
    (so swapped wiring fails), and the reported CVs and max/mean load computed in plain Python from the statistics."""
    ids = _ids()
    for w_importance, w_load in ((0.3, 0.0), (0.0, 0.7), (0.3, 0.7)):
        model = _model(importance_loss_coef=w_importance, load_loss_coef=w_load, **ROUTER_OVERRIDES[router_type])
        model.train(training)
        torch.manual_seed(0)
        out = model(input_ids=ids, labels=ids)
        (layer,) = out.router_outputs
        importance, load = layer.importance.tolist(), layer.load.tolist()
        assert out.importance_loss.item() == pytest.approx(w_importance * _cv(importance) ** 2, rel=1e-5, abs=1e-9)
        assert out.load_loss.item() == pytest.approx(w_load * _cv(load) ** 2, rel=1e-5, abs=1e-9)
        assert layer.cv_importance.item() == pytest.approx(_cv(importance), rel=1e-5)
        assert layer.cv_load.item() == pytest.approx(_cv(load), rel=1e-5, abs=1e-6)
        assert layer.max_mean_load.item() == pytest.approx(max(load) / (sum(load) / len(load)), rel=1e-5)
    assert _cv(importance) > 0.01 and (_cv(load) > 0.01 or (router_type == "balanced" and training))


def test_tuple_outputs_start_with_loss_and_logits_like_built_in_causal_lms():
    # `model(ids)[0]` is the logits and `return_dict=False` gives (loss, logits, ...) as for Llama or OLMoE, although
    # the balancing losses (`aux_loss`) are always computed here.
    model, ids = _model(), _ids()
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(model(input_ids=ids)[0], out.logits)
    loss, logits, *rest = model(input_ids=ids, labels=ids, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert torch.equal(model(input_ids=ids, return_dict=False)[0], out.logits)
    assert out.aux_loss is not None and torch.equal(out.loss, out.lm_loss + out.aux_loss)


def test_compiles_as_one_graph_with_grouped_mm_experts():
    # torch.compile(fullgraph=True) needs no data-dependent Python branch: the token-id check steps aside while
    # compiling. (`moe_fused` splits its work by expert counts on the host, so it compiles with graph breaks only.)
    model, ids = _model(), _ids()
    model.set_experts_implementation("grouped_mm")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)


def test_expert_statistics_are_reported():
    model = _model()
    out = model(input_ids=_ids())
    stats = out.router_outputs[0]
    assert stats.tokens_per_expert.sum() == 2 * 10 * 2  # every token goes to k=2 experts
    assert stats.cv_load >= 0 and stats.cv_importance >= 0 and stats.max_mean_load >= 1
    summary = model.pop_expert_statistics()
    assert set(summary) == {
        "importance_loss",
        "load_loss",
        "layer_1/cv_importance",
        "layer_1/cv_load",
        "layer_1/max_mean_load",
    }
    assert summary["layer_1/cv_load"] == pytest.approx(float(stats.cv_load), rel=1e-5)
    assert model.pop_expert_statistics() == {}  # popped


def test_expert_statistics_sum_over_the_forwards_since_the_last_pop():
    """Between two logs the statistics describe every token seen: Importance, Load, token counts and dropped
    assignments are summed over the forwards, the CVs and max/mean load are those of the sums, and the losses are the
    mean per forward."""
    model = _model(expert_capacity_factor=0.5).train()  # capacity 4 for 40 assignments over 6 experts: drops
    outputs = [model(input_ids=_ids(seed=seed)).router_outputs[0] for seed in (1, 2, 3)]
    assert all(int(out.dropped_tokens) > 0 for out in outputs)
    tokens = model.expert_statistics.tokens_per_expert_by_layer()
    summary = model.pop_expert_statistics()
    importance, load, counts = (
        [sum(getattr(out, f)[e].item() for out in outputs) for e in range(6)]
        for f in ("importance", "load", "tokens_per_expert")
    )
    assert tokens == [counts]
    for loss in ("importance_loss", "load_loss"):
        assert summary[loss] == pytest.approx(sum(getattr(out, loss).item() for out in outputs) / 3, rel=1e-5)
    assert summary["layer_1/cv_importance"] == pytest.approx(_cv(importance), rel=1e-5)
    assert summary["layer_1/cv_load"] == pytest.approx(_cv(load), rel=1e-5)
    assert summary["layer_1/max_mean_load"] == pytest.approx(max(load) / (sum(load) / 6), rel=1e-5)
    assert summary["layer_1/dropped_tokens"] == sum(int(out.dropped_tokens) for out in outputs)


def test_router_statistics_of_a_cached_step_take_the_new_tokens_flags_from_the_end_of_the_mask():
    """A 2-D attention mask covers the cached tokens and the new ones, so the new tokens' padding flags are its last
    columns (SPEC §3: padding is left out of Importance and Load), whatever padding the cached part holds."""
    model = _model()
    ids = _ids(batch=2, length=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, all of it in the cached part
    prefix = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
    step = model(input_ids=ids[:, 5:], attention_mask=mask, use_cache=True, **{CACHE_NAME: getattr(prefix, CACHE_NAME)})
    full = model(input_ids=ids, attention_mask=mask).router_outputs[0]
    (prefix_stats,), (step_stats,) = prefix.router_outputs, step.router_outputs
    assert step_stats.tokens_per_expert.sum() == 2 * 3 * 2  # all 2 x 3 new tokens, k = 2 experts each
    assert torch.equal(prefix_stats.tokens_per_expert + step_stats.tokens_per_expert, full.tokens_per_expert)
    assert torch.allclose(prefix_stats.importance + step_stats.importance, full.importance, atol=1e-5)


def test_evaluation_is_deterministic_and_training_routes_differently():
    model = _model()
    ids = _ids()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
    first = model(input_ids=ids).router_outputs[0].tokens_per_expert
    assert any(not torch.equal(first, model(input_ids=ids).router_outputs[0].tokens_per_expert) for _ in range(5))


def test_save_and_load_gives_bitwise_identical_logits(tmp_path):
    model = _model()
    ids = _ids()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe.MoEForCausalLM"
    assert config["auto_map"]["AutoModel"] == "modeling_moe.MoEModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_moe.MoEConfig"
    for source in ("modeling_moe.py", "configuration_moe.py", "gating.py"):
        assert (tmp_path / source).exists(), source
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoEForCausalLM
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_remote_code_load_without_the_package_gives_identical_logits(tmp_path):
    model = _model(expert_activation="swiglu", num_hidden_layers=3, moe_layers=[0, 2])
    folder = tmp_path / "exported"
    model.save_pretrained(folder)
    ids = _ids()
    (remote_logits,) = run_remote_code_load([folder], ids, tmp_path)
    assert torch.equal(remote_logits, model(input_ids=ids).logits)


def test_greedy_generation_with_cache_equals_without_cache():
    model = _model()
    prompt = _ids(batch=1, length=5)
    with_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True, min_new_tokens=20)
    without_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, min_new_tokens=20)
    assert with_cache.shape == (1, 25)
    assert torch.equal(with_cache, without_cache)


def _olmoe_cache_field() -> str:
    """The output field under which transformers' own MoE model returns its KV cache (the reference)."""
    out = tiny_olmoe().eval()(input_ids=_ids(batch=1, length=3, vocab=64), use_cache=True)
    (field,) = [name for name, value in out.items() if isinstance(value, Cache)]
    return field


@pytest.mark.parametrize("argument", ["cache", "past_key_values"])
def test_decoding_step_by_step_with_an_explicit_cache_matches_the_full_forward(argument):
    # transformers 5.24 renamed `past_key_values` to `cache`: both argument names are accepted, and the cache comes
    # back under the same output field as the installed library's own models.
    assert CACHE_NAME == _olmoe_cache_field()
    model = _model()
    ids = _ids(batch=2, length=9)
    full_logits = model(input_ids=ids).logits
    prefix = model(input_ids=ids[:, :6], use_cache=True)
    cache = getattr(prefix, CACHE_NAME)
    assert isinstance(cache, Cache) and cache.get_seq_length() == 6
    logits = [prefix.logits]
    for position in range(6, 9):
        step = model(input_ids=ids[:, position : position + 1], use_cache=True, **{argument: cache})
        assert getattr(step, CACHE_NAME) is cache
        logits.append(step.logits)
    assert cache.get_seq_length() == 9
    assert torch.allclose(torch.cat(logits, dim=1), full_logits, atol=1e-5)
    with pytest.raises(ValueError, match="`cache` or as `past_key_values`"):
        model(input_ids=ids, cache=cache, past_key_values=DynamicCache(config=model.config))


def test_gradient_checkpointing_leaves_an_explicit_cache_untouched():
    # The checkpointed layer drops the cache (its backward replay would write it twice); it must find it by the name
    # the installed transformers uses.
    model = _model(num_hidden_layers=3, moe_layers="all").train()
    model.activation_checkpointing_enable()
    cache = DynamicCache(config=model.config)
    ids = _ids()
    model(input_ids=ids, labels=ids, use_cache=True, **{CACHE_NAME: cache}).loss.backward()
    assert cache.get_seq_length() == 0


def test_sdpa_and_eager_attention_agree():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = {}
    for implementation in ("sdpa", "eager"):
        model = _model()
        model.set_attn_implementation(implementation)
        assert model.config._attn_implementation == implementation
        logits[implementation] = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(logits["sdpa"][real], logits["eager"][real], atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_left_padded_batch_matches_each_example_alone(attn_implementation):
    model = _model()
    model.set_attn_implementation(attn_implementation)
    first, second = _ids(batch=1, length=8, seed=3), _ids(batch=1, length=5, seed=4)
    pad = model.config.pad_token_id
    batch = torch.cat([first, torch.cat([torch.full((1, 3), pad), second], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model(input_ids=batch, attention_mask=mask)
    assert torch.allclose(out.logits[0], model(input_ids=first).logits[0], atol=1e-5)
    assert torch.allclose(out.logits[1, 3:], model(input_ids=second).logits[0], atol=1e-5)
    # Padding tokens are left out of the expert statistics (SPEC §3).
    assert out.router_outputs[0].tokens_per_expert.sum() == (8 + 5) * 2


def test_left_padded_batch_generation_matches_each_example_alone():
    model = _model()
    first, second = _ids(batch=1, length=6, seed=5), _ids(batch=1, length=4, seed=6)
    batch = torch.cat([first, torch.cat([torch.zeros(1, 2, dtype=torch.long), second], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    together = model.generate(batch, attention_mask=mask, **settings)
    assert torch.equal(together[0, 6:], model.generate(first, **settings)[0, 6:])
    assert torch.equal(together[1, 6:], model.generate(second, **settings)[0, 4:])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_continuous_batching_matches_greedy_generation(attn_implementation):
    # `generate_batch` (and `transformers serve`) hand the model a paged KV cache as `cache`, which the attention layer
    # (transformers >= 5.24) or the paged attention function (earlier) updates; as OLMoE does, each request's tokens
    # must be those of plain greedy generation.
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = _model()
    model.set_attn_implementation(attn_implementation)
    prompts = [_ids(batch=1, length=length, seed=length)[0].tolist() for length in (9, 5, 12)]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    # A small paged cache: sized from the free memory, it takes seconds to set up.
    paged = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=paged, warmup=False)
    results = {tuple(output.prompt_ids): output for output in outputs.values()}
    for prompt in prompts:
        result = results[tuple(prompt)]
        assert result.error is None
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert result.generated_tokens == greedy[0, len(prompt) :].tolist()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Reentrant checkpointing runs a layer without autograd and reconnects only the tensors of its output tuple: the
    balancing losses must be among them, or the gates silently lose their load/importance gradients (SPEC §3)."""
    ids = _ids()
    gradients = []
    for checkpointing in (False, True):
        model = _model(num_hidden_layers=3, moe_layers="all").train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
            assert model.is_activation_checkpointing
        torch.manual_seed(42)  # the same gate noise in both runs (checkpointing replays the RNG state)
        model(input_ids=ids, labels=ids).loss.backward()
        gradients.append({name: param.grad.clone() for name, param in model.named_parameters()})
    for name, grad in gradients[0].items():
        assert torch.allclose(grad, gradients[1][name], atol=1e-6), name


def test_resize_token_embeddings():
    model = _model()
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.get_input_embeddings().weight.shape == (120, 32)
    assert model.lm_head.weight.shape == (120, 32)
    ids = torch.tensor([[5, 110, 119]])
    assert model(input_ids=ids, labels=ids).logits.shape == (1, 3, 120)
    with pytest.raises(ValueError, match="token id 120"):
        model(input_ids=torch.tensor([[120]]))


@pytest.mark.parametrize("expert_activation", ["relu", "swiglu"])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_experts_implementations_match_eager(tmp_path, expert_activation, implementation):
    model = _model(expert_activation=expert_activation, num_experts=8, num_experts_per_tok=3)
    model.save_pretrained(tmp_path)
    ids = _ids(batch=3, length=12)
    outputs, gradients = {}, {}
    for name in ("eager", implementation):
        loaded = MoEForCausalLM.from_pretrained(tmp_path, experts_implementation=name).train()
        assert loaded.config._experts_implementation == name
        torch.manual_seed(7)
        out = loaded(input_ids=ids, labels=ids)
        out.loss.backward()
        outputs[name] = out.logits
        gradients[name] = {n: p.grad for n, p in loaded.named_parameters() if p.grad is not None}
    assert torch.allclose(outputs["eager"], outputs[implementation], atol=1e-5)
    for name, grad in gradients["eager"].items():
        assert torch.allclose(grad, gradients[implementation][name], atol=1e-5), name


def test_fp16_and_bf16_forward_is_finite():
    for dtype in (torch.bfloat16, torch.float16):
        model = _model().to(dtype).train()
        ids = _ids()
        out = model(input_ids=ids, labels=ids)
        assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all(), dtype


def test_trainer_trains_and_predicts_logits(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = _ids(batch=8, length=12)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = Trainer(model=_model(), args=args, train_dataset=dataset, eval_dataset=dataset)
    trainer.train()
    prediction = trainer.predict(dataset)
    # Only the logits come back as predictions; the balancing losses and router outputs are not gathered.
    assert prediction.predictions.shape == (8, 12, 97)
    assert prediction.metrics["test_loss"] > 0


def test_trainer_label_smoothing_shifts_the_labels_as_for_built_in_causal_lms(tmp_path):
    # With `label_smoothing_factor`, Trainer computes the loss itself and shifts the labels by one only for the causal
    # LMs it knows by name: OLMoE is one; ours must be one too, or every position learns to copy its own input token.
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    for model, ids in ((tiny_olmoe().eval(), _ids(vocab=64)), (_model(), _ids())):
        trainer = Trainer(model=model, args=args)
        with torch.no_grad():
            loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids.clone()})
            outputs = model(input_ids=ids)
        assert torch.allclose(loss, LabelSmoother(0.1)(outputs, ids, shift_labels=True)), type(model).__name__


def test_balancing_losses_are_weighted_like_the_lm_loss_under_gradient_accumulation():
    model = _model().eval()
    ids = _ids()
    whole = model(input_ids=ids, labels=ids)
    labelled = ids[:, 1:].numel()
    # Trainer passes the label count of all accumulated micro-batches; this one holds a quarter of them.
    share = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(4 * labelled))
    assert torch.allclose(share.aux_loss, whole.aux_loss)
    assert torch.allclose(share.loss, share.lm_loss + whole.aux_loss / 4)
    assert torch.allclose(share.lm_loss, whole.lm_loss / 4)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ],
    ids=lambda p: p["rope_type"],
)
def test_scaled_rope_types_build_and_match_llama(rope_parameters):
    # transformers' RoPE initializers for "dynamic" / "yarn" read `config.head_dim`: the config must resolve it, as
    # LlamaConfig does, or the model fails to build.
    model = MoEForCausalLM(tiny_config(rope_parameters=dict(rope_parameters))).eval()
    ids = torch.randint(1, 97, (1, 150))  # longer than max_position_embeddings (128)
    assert model(input_ids=ids).logits.shape == (1, 150, 97)
    llama_config = LlamaConfig(
        hidden_size=32, num_attention_heads=4, max_position_embeddings=128, rope_parameters=dict(rope_parameters)
    )
    x, positions = torch.zeros(1, 200, 32), torch.arange(200)[None]
    ours = MoERotaryEmbedding(model.config)(x, positions)
    reference = LlamaRotaryEmbedding(llama_config)(x, positions)
    for a, b in zip(ours, reference, strict=True):
        assert torch.allclose(a, b)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts_per_tok=99), "`num_experts_per_tok` must be between 1 and `num_experts` \\(6\\), got 99"),
        (dict(load_loss_coef=-1.0), "`load_loss_coef` must be a finite number >= 0, got -1.0"),
        (dict(router_type="bogus"), "`router_type` must be one of .*, got 'bogus'"),
    ],
)
def test_from_pretrained_overrides_are_validated(tmp_path, overrides, message):
    MoEForCausalLM(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path, **overrides)


def test_a_config_changed_after_construction_is_checked_before_building():
    config = tiny_config()
    config.num_experts_per_tok = 9
    with pytest.raises(ValueError, match="`num_experts_per_tok` must be between 1"):
        MoEForCausalLM(config)
