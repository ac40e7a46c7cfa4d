"""Sparsely-gated Mixture-of-Experts causal language model (Shazeer et al., 2017) for Hugging Face Transformers.

A Llama-style decoder (RMSNorm, RoPE, grouped-query attention through the attention-function interface) whose
feed-forward blocks are sparsely-gated MoE layers (`config.moe_layers`), with the noisy top-k gate and the importance
and load balancing losses of SPEC.md §2-§3. The file travels to the Hub as remote code with its relative imports.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.integrations import use_experts_implementation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .balanced_gating import BalancedRouter
from .configuration_moe import MoEConfig
from .expert_statistics import ExpertStatistics

# Registers "moe_fused" in transformers' experts interface; a `from .x import` line so it travels as remote code.
from .fast_experts import FAST_EXPERTS_IMPLEMENTATION
from .gating import (
    RouterOutput,
    TopKRouter,
    limit_expert_capacity,
    router_from_config,
    training_forward_without_autograd,
)

# transformers 5.24 renamed the KV cache argument and output field from `past_key_values` to `cache`. The model runs
# on either: it accepts both argument names, hands the cache to its decoder layers under the installed library's name
# (which gradient checkpointing looks for, to drop it) and returns it under that output field.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# Continuous batching (`generate_batch`, `transformers serve`) hands the model its paged KV cache as `cache`. Before
# transformers 5.24 the attention functions update that cache themselves (they take it as their `cache` keyword); from
# 5.24 on the attention layer updates it, with the attention kwargs, which it fills in place (read and write indices).
ATTENTION_FUNCTION_UPDATES_PAGED_CACHE = "cache" in inspect.signature(sdpa_attention_forward).parameters


def _resolve_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache passed as `cache` (transformers >= 5.24) or `past_key_values` (earlier 5.x), never both."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values` (its older name), not both.")
    return cache if cache is not None else past_key_values


class MoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MoERotaryEmbedding(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MoEConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)  # (batch, seq_len, head_dim)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, num_key_value_heads, seq_len, head_dim) -> (batch, num_key_value_heads * n_rep, seq_len, head_dim)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class MoEAttention(nn.Module):
    """Multi-head (grouped-query) self-attention with RoPE, dispatched through `config._attn_implementation`."""

    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (batch, heads, seq, head_dim)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if ATTENTION_FUNCTION_UPDATES_PAGED_CACHE and isinstance(cache, PagedAttentionCache):
            kwargs["cache"] = cache
        elif cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class MoEMLP(nn.Module):
    """Dense feed-forward block of the non-MoE layers, with the experts' activation (ReLU or SwiGLU)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.gated = config.expert_activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN["silu" if self.gated else "relu"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


def _experts_eager_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Reference experts computation: one small matmul per expert that received tokens.

    hidden_states `(num_tokens, hidden)`, top_k_index / top_k_weights `(num_tokens, k)` -> `(num_tokens, hidden)`.
    """
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=experts.num_experts + 1)  # (tokens, k, n+1)
        expert_mask = expert_mask.permute(2, 1, 0)  # (n+1, k, tokens)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == experts.num_experts:  # expert-parallel sentinel: the expert lives on another rank
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        if experts.has_gate:
            gate, up = nn.functional.linear(current_state, experts.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current_hidden_states = experts.act_fn(gate) * up
        else:
            current_hidden_states = experts.act_fn(nn.functional.linear(current_state, experts.up_proj[expert_idx]))
        current_hidden_states = nn.functional.linear(current_hidden_states, experts.down_proj[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


@use_experts_implementation(has_gate=False)
class MoEExperts(nn.Module):
    """The paper's experts (SPEC §1): one ReLU hidden layer each, stored fused as 3-D parameters.

    up_proj `(num_experts, expert_intermediate_size, hidden)`, down_proj `(num_experts, hidden, expert_intermediate_size)`.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.expert_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN["relu"]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return _experts_eager_forward(self, hidden_states, top_k_index, top_k_weights)


@use_experts_implementation(has_gate=True)
class MoEGatedExperts(nn.Module):
    """SwiGLU experts: gate_up_proj `(num_experts, 2 * expert_intermediate_size, hidden)` ([gate; up]), down_proj."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.expert_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN["silu"]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return _experts_eager_forward(self, hidden_states, top_k_index, top_k_weights)


# Experts implementations that skip expert ids `>= num_experts` (the expert-parallel sentinel) in a single process too;
# transformers' `batched_mm` / `grouped_mm` accept that id only under expert parallelism.
_SKIPS_SENTINEL_IDS = ("eager", FAST_EXPERTS_IMPLEMENTATION)


class MoESparseBlock(nn.Module):
    """The sparsely-gated MoE layer of SPEC §1: `y = sum_i G(x)_i E_i(x)`, computing only the selected experts."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.gate = router_from_config(config)
        self.experts = MoEGatedExperts(config) if config.expert_activation == "swiglu" else MoEExperts(config)
        self.num_experts = config.num_experts
        self.experts_per_token = config.experts_per_token
        self.expert_capacity_factor = config.expert_capacity_factor

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, RouterOutput]:
        """hidden_states `(batch, seq_len, hidden)`, token_mask `(batch, seq_len)` (0 on padding)."""
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        flat_hidden_states = hidden_states.reshape(-1, hidden_dim)  # (num_tokens, hidden)
        flat_mask = token_mask.reshape(-1) if token_mask is not None else None
        _, top_k_weights, top_k_index, router_output = self.gate(flat_hidden_states, flat_mask)
        if self.expert_capacity_factor is not None:
            top_k_weights = limit_expert_capacity(
                router_output,
                top_k_index,
                top_k_weights,
                self.expert_capacity_factor,
                self.experts_per_token,
                self.num_experts,
                flat_mask,
                self.training,
            )
        # PEFT LoRA on the expert weights wraps the experts module; the base module holds the implementation's state.
        experts = self.experts.get_base_layer() if hasattr(self.experts, "get_base_layer") else self.experts
        if not experts._is_expert_parallel and experts.config._experts_implementation in _SKIPS_SENTINEL_IDS:
            # SPEC §1: only experts with G(x)_i != 0 are computed. The balanced router's unused slots and the
            # assignments over capacity have weight 0 (times a zero mask: no gradient either); the sentinel skips them.
            top_k_index = top_k_index.masked_fill(top_k_weights.detach() == 0, self.num_experts)
        expert_output = self.experts(flat_hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype))
        return expert_output.reshape(batch_size, sequence_length, hidden_dim), router_output


class MoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MoEAttention(config=config, layer_idx=layer_idx)
        self.is_moe_layer = layer_idx in config.moe_layer_indices
        self.mlp = MoESparseBlock(config) if self.is_moe_layer else MoEMLP(config)
        self.input_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, RouterOutput | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns the layer's output, its `RouterOutput` (`None` for a dense layer) and that output's two balancing
        losses again as tensors of the top-level tuple: gradient checkpointing with `use_reentrant=True` runs the
        forward without autograd and reconnects only the tensors it returns directly, not those inside a dataclass."""
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_resolve_cache(cache, past_key_values),
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if not self.is_moe_layer:
            return residual + self.mlp(hidden_states), None, None, None
        # Reentrant checkpointing runs this first without autograd (every rank, in training): the statistics are still
        # summed over the ranks, so the returned losses are the global batch's as in the recomputation in backward.
        # (Entered only then: `torch.compile` cannot trace the context variable's update.)
        if self.gradient_checkpointing and self.training:
            with training_forward_without_autograd():
                hidden_states, router_output = self.mlp(hidden_states, token_mask)
        else:
            hidden_states, router_output = self.mlp(hidden_states, token_mask)
        return residual + hidden_states, router_output, router_output.importance_loss, router_output.load_loss


@dataclass
class MoEModelOutputWithPast(MoeModelOutputWithPast):
    r"""
    aux_loss (`torch.Tensor`): sum over the MoE layers of `L_importance + L_load` (SPEC §3), coefficients applied.
    importance_loss (`torch.Tensor`), load_loss (`torch.Tensor`): the two parts of `aux_loss`.
    router_outputs (`tuple[RouterOutput]`): per MoE layer, its losses and expert statistics.
    """

    aux_loss: torch.Tensor | None = None
    importance_loss: torch.Tensor | None = None
    load_loss: torch.Tensor | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None


@dataclass
class MoECausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    loss (`torch.Tensor`): with `labels`, the language-modelling loss plus `aux_loss`.
    lm_loss (`torch.Tensor`): the language-modelling (next-token cross-entropy) loss alone.
    aux_loss (`torch.Tensor`): sum over the MoE layers of `L_importance + L_load` (SPEC §3), coefficients applied.
    importance_loss (`torch.Tensor`), load_loss (`torch.Tensor`): the two parts of `aux_loss`.
    router_outputs (`tuple[RouterOutput]`): per MoE layer, its losses and expert statistics.
    """

    # After the fields of `CausalLMOutputWithPast`, so that `outputs[0]` / the tuple of `return_dict=False` start with
    # (loss,) logits as for built-in causal LMs: `aux_loss` is always set here, unlike OLMoE's.
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    importance_loss: torch.Tensor | None = None
    load_loss: torch.Tensor | None = None
    router_outputs: tuple[RouterOutput, ...] | None = None


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    config: MoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoEDecoderLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {
        # Every MoE block's router, whatever its type (the hierarchical router's inner gates are not recorded).
        "router_logits": OutputRecorder(target_class=None, index=0, class_name="mlp.gate"),
        "hidden_states": OutputRecorder(MoEDecoderLayer, index=0),
        "attentions": OutputRecorder(MoEAttention, index=1),
    }

    def __init__(self, config: MoEConfig, *inputs, **kwargs):
        # `from_pretrained(folder, num_experts_per_tok=...)` and assignments after construction set config values
        # without the checks construction runs: check them before building (plain ValueError naming the field).
        config.validate_moe_values()
        super().__init__(config, *inputs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        # Remote code: name both auto classes, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` works too
        # (transformers only records the saved class's own auto class).
        if type(self)._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", "modeling_moe.MoEModel")
            auto_map.setdefault("AutoModelForCausalLM", "modeling_moe.MoEForCausalLM")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # The fused path is the default: it beat transformers' `grouped_mm` in training (README, "Performance").
        requested = FAST_EXPERTS_IMPLEMENTATION if requested_experts is None else requested_experts
        return super().get_correct_experts_implementation(requested)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MoEExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MoEGatedExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, BalancedRouter):
            # Random W_g: at zero every softmax gate ties and all experts would take the same tokens (SPEC §5).
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.threshold)
        elif isinstance(module, TopKRouter):
            # SPEC §2: both gate matrices start at zero.
            init.zeros_(module.weight)
            if module.noisy:
                init.zeros_(module.noise_weight)


def _check_inputs(
    config: MoEConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> None:
    """Raise a clear error for malformed inputs before they reach torch kernels."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise TypeError(f"`input_ids` must be an integer (int64/int32) tensor, got {got}.")
        if input_ids.dim() != 2:
            raise ValueError(
                f"`input_ids` must have shape (batch_size, sequence_length), got {tuple(input_ids.shape)}."
            )
        # A data-dependent check: skipped under torch.compile (fullgraph) / tracing, as built-in models have none.
        if input_ids.numel() > 0 and not torch.compiler.is_compiling():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"`input_ids` contains token id {bad}, outside the vocabulary [0, {config.vocab_size}) "
                    f"(vocab_size={config.vocab_size})."
                )
        batch_size, sequence_length = input_ids.shape
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must have shape (batch_size, sequence_length, {config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}."
            )
        batch_size, sequence_length = inputs_embeds.shape[:2]
    if attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"`attention_mask` has batch size {attention_mask.shape[0]} but the inputs have batch size "
                f"{batch_size}."
            )
        # A 2-D mask covers the cached tokens and the new ones: at least the new ones.
        if attention_mask.shape[1] < sequence_length:
            raise ValueError(
                f"`attention_mask` has length {attention_mask.shape[1]}, shorter than the {sequence_length} new "
                f"tokens of the inputs (a 2-D mask covers the cached tokens and the new ones)."
            )


def _sum_router_outputs(router_outputs: list[RouterOutput], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Total importance and load losses over the MoE layers (zero for a model without MoE layers)."""
    importance_loss = like.new_zeros((), dtype=torch.float32)
    load_loss = like.new_zeros((), dtype=torch.float32)
    for router_output in router_outputs:
        # Layers may sit on other devices (`device_map`); gathered on `like`'s, as OLMoE's aux loss does.
        importance_loss = importance_loss + router_output.importance_loss.to(like.device)
        load_loss = load_loss + router_output.load_loss.to(like.device)
    return importance_loss, load_loss


def _aux_loss_share(labels: torch.Tensor, loss_kwargs: dict) -> torch.Tensor | float:
    """Weight of this batch's balancing losses when the LM loss is a share of a larger (accumulated) batch.

    Under gradient accumulation Trainer passes `num_items_in_batch` (the label count of all micro-batches) and no
    longer divides the loss by the number of micro-batches; weighting each micro-batch's balancing losses by its share
    of the labels makes them add up to a label-weighted mean, as the LM loss does. Outside Trainer the weight is 1.
    """
    num_items_in_batch = loss_kwargs.get("num_items_in_batch")
    if num_items_in_batch is None:
        return 1.0
    local_items = (labels[..., 1:] != -100).sum()  # the labels the causal LM loss counts (shifted by one)
    return local_items.to(torch.float32) / torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1)


class MoEModel(MoEPreTrainedModel):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoEModelOutputWithPast:
        _check_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        cache = _resolve_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        sequence_length = inputs_embeds.shape[1]

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(sequence_length, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # The cache goes by position: its keyword is `cache` from transformers 5.24 on, `past_key_values` before.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        # SPEC §3: padding tokens are left out of Importance(X) and Load(X). A 2-D mask covers past and new tokens.
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -sequence_length:]

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        router_outputs = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, router_output, importance_loss, load_loss = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **{CACHE_NAME: cache},
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                **kwargs,
            )
            if router_output is not None:
                # The losses from the top-level tuple: the ones gradient checkpointing (reentrant) connects to autograd.
                router_outputs.append(replace(router_output, importance_loss=importance_loss, load_loss=load_loss))
        hidden_states = self.norm(hidden_states)

        importance_loss, load_loss = _sum_router_outputs(router_outputs, hidden_states)
        return MoEModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_NAME: cache},
            aux_loss=importance_loss + load_loss,
            importance_loss=importance_loss,
            load_loss=load_loss,
            router_outputs=tuple(router_outputs),
        )


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.model = MoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Running sums of the expert statistics since the last `pop_expert_statistics()`, for logging callbacks.
        self.expert_statistics = ExpertStatistics()
        self.post_init()

    def pop_expert_statistics(self) -> dict[str, float]:
        """Expert statistics accumulated over the forward passes since the last call (then reset).

        Keys: `importance_loss`, `load_loss`, and per MoE layer `layer_{i}/cv_importance`, `layer_{i}/cv_load`,
        `layer_{i}/max_mean_load`. Trainer callbacks read these from the `model` they are given.
        """
        return self.expert_statistics.pop(self.config.moe_layer_indices)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoECausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the loss); `-100` is ignored. With labels, `loss` is the language-modelling
            loss plus the balancing losses of every MoE layer, whatever `output_router_logits` says.

        Example:

        ```python
        >>> from modeling_moe import MoEConfig, MoEForCausalLM
        >>> model = MoEForCausalLM(MoEConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_experts=8))
        >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
        >>> out.loss, out.aux_loss
        ```
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if labels is not None and (input_ids is not None or inputs_embeds is not None):
            inputs_name, inputs_shape = (
                ("input_ids", input_ids.shape) if input_ids is not None else ("inputs_embeds", inputs_embeds.shape[:2])
            )
            if labels.shape != inputs_shape:
                raise ValueError(
                    f"`labels` must have shape (batch_size, sequence_length) = {tuple(inputs_shape)} of "
                    f"`{inputs_name}`, got {tuple(labels.shape)}."
                )
        outputs: MoEModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        self.expert_statistics.add(outputs.router_outputs)

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            loss = lm_loss + outputs.aux_loss.to(lm_loss.device) * _aux_loss_share(labels, kwargs)

        return MoECausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=outputs.aux_loss,
            importance_loss=outputs.importance_loss,
            load_loss=outputs.load_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            router_outputs=outputs.router_outputs,
        )


# Trainer's label smoothing (`label_smoothing_factor`) shifts the labels by one only for the class names of this table
# of built-in causal LMs (models registered with `AutoModelForCausalLM.register` are not looked up); without the entry
# it smoothed an unshifted loss, every position trained to predict its own input token. Added here, with the model, so
# that the remote-code copy adds it too. The table is read only for model types with a built-in config, so the entry
# changes no auto-class lookup. (It also lets Trainer's model card tag the model "text-generation".)
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MoEConfig.model_type, MoEForCausalLM.__name__)


__all__ = ["MoEForCausalLM", "MoEModel", "MoEPreTrainedModel"]
