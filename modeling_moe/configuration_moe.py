"""Configuration of the sparsely-gated Mixture-of-Experts language model (Shazeer et al., 2017)."""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ROUTER_TYPES = ("noisy_top_k", "softmax_top_k", "hierarchical", "balanced")
EXPERT_ACTIVATIONS = ("relu", "swiglu")
ROUTER_STATISTICS_SCOPES = ("global", "local")


@strict
class MoEConfig(PreTrainedConfig):
    r"""
    Configuration of [`MoEForCausalLM`]: a Llama-style decoder whose feed-forward blocks are (some or all)
    sparsely-gated Mixture-of-Experts layers, as in "Outrageously Large Neural Networks" (Shazeer et al., 2017).

    Args:
        vocab_size (`int`): Number of token ids.
        hidden_size (`int`): Width of the residual stream (the experts' input and output size).
        intermediate_size (`int`): Hidden size of the dense feed-forward blocks (layers that are not MoE).
        num_hidden_layers (`int`): Number of decoder layers.
        num_attention_heads (`int`), num_key_value_heads (`int`, *optional*), head_dim (`int`, *optional*):
            Attention geometry (grouped-query attention when `num_key_value_heads < num_attention_heads`).
        max_position_embeddings (`int`): Longest sequence the rotary embedding is set up for.
        rope_parameters (`dict`, *optional*): RoPE settings, `{"rope_type": "default", "rope_theta": 10000.0}` by default.
        num_experts (`int`): Number of experts `n` in each MoE layer.
        num_experts_per_tok (`int`): Number of experts `k` kept per token (SPEC §2 `KeepTopK`). The paper keeps
            `k > 1`: the gate values are the softmax of the `k` kept logits, so with `k = 1` the one value is always 1
            and neither the model's loss nor `L_importance` reaches the gate; `noisy_top_k` then learns its routing
            from `L_load` alone, `softmax_top_k` not at all. Likewise the hierarchical primary gate with
            `num_groups_per_tok=1` learns from `Load_H` alone.
        expert_intermediate_size (`int`): Hidden size of each expert (1024 in the paper's language models).
        expert_activation (`str`): `"relu"` (one ReLU hidden layer, the paper's expert) or `"swiglu"` (gated SiLU).
            Also used by the dense feed-forward blocks.
        moe_layers (`"all"`, `int` or `list[int]`): which decoder layers are MoE. `"all"`; an int `N` for every
            N-th layer (layers `N-1, 2N-1, ...`); or an explicit list of layer indices. The others are dense.
        router_type (`str`): `"noisy_top_k"` (SPEC §2, the paper's gate), `"softmax_top_k"` (no noise),
            `"hierarchical"` (SPEC §4: a noisy top-k gate over groups of experts, then one within each chosen group) or
            `"balanced"` (SPEC §5: strictly balanced batchwise gating in training, learned thresholds at inference).
        num_expert_groups (`int`): Hierarchical router only: the number of groups `a`; each holds
            `b = num_experts // num_expert_groups` experts (`num_experts` must be a multiple). 1 for other routers.
        num_groups_per_tok (`int`): Hierarchical router only: groups kept per token by the primary gate (`k` of the
            first level, `1 <= num_groups_per_tok <= num_expert_groups`). With the hierarchical router,
            `num_experts_per_tok` is the `k` of the second level (experts kept in each chosen group, at most `b`), so
            a token goes to `num_groups_per_tok * num_experts_per_tok` experts. 1 for other routers.
        batchwise_loss_coef (`float`): Balanced router only: coefficient of `L_batchwise` (SPEC §5), which trains the
            per-expert thresholds used at inference; it is added to the layer's `load_loss`.
        expert_capacity_factor (`float`, *optional*): In training, each expert takes at most
            `ceil(expert_capacity_factor * experts_per_token * tokens / num_experts)` of the batch's non-padding tokens;
            the assignments over it get weight 0 and are skipped (the residual connection carries those tokens) and
            counted in `RouterOutput.dropped_tokens`. `None` (default): no token is dropped. Evaluation never drops tokens.
        noise_epsilon (`float`): Floor added to the noise scale in training (SPEC §2, reference value 1e-2); must be
            positive (SPEC §3: the smooth load estimator divides by the noise scale).
        importance_loss_coef (`float`), load_loss_coef (`float`): `w_importance`, `w_load` of SPEC §3
            (paper's language-modelling defaults: 0.1 and 0.1).
        output_router_logits (`bool`): Whether to return each MoE layer's clean router logits.
        expert_recompute_activations (`bool`): Recompute the experts' hidden activations in the backward pass instead
            of storing them (SPEC §6), trading one more up-projection per MoE layer for memory. Honoured by the
            default `experts_implementation="moe_fused"` (see `fast_experts.py`).
        router_statistics_scope (`str`): `"global"` (SPEC §3: under data parallelism, `Importance(X)` and `Load(X)`
            are summed over the ranks before the CV, with gradients) or `"local"` (each rank's own batch).
    """

    model_type = "sparsely_gated_moe"
    # Trainer's prediction step gathers every other output as predictions: keep them to the logits.
    keys_to_ignore_at_inference = [
        "cache",  # the KV cache's output field from transformers 5.24 on
        "past_key_values",  # its name before
        "lm_loss",
        "aux_loss",
        "importance_loss",
        "load_loss",
        "router_logits",
        "router_outputs",
        "hidden_states",
        "attentions",
    ]

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert-parallel plan of [`MoEModel`] (SPEC §6), read by `from_pretrained(distributed_config=...)`.

        Each MoE layer's fused expert weights are split on the expert dimension over the `ep_size` ranks
        (`grouped_gemm`), and its experts module exchanges tokens with the other ranks (`ep_dispatch_experts`,
        all-to-all in training). Gates, attention and dense feed-forward layers are not named, so they stay data
        parallel. The rules name only `mlp.experts`, which dense layers do not have, and only the weights this
        config's experts have (`up_proj` for ReLU experts, `gate_up_proj` for SwiGLU), so every rule matches.
        """
        up_proj = "gate_up_proj" if self.expert_activation == "swiglu" else "up_proj"
        return {
            f"layers.*.mlp.experts.{up_proj}": "grouped_gemm",
            "layers.*.mlp.experts.down_proj": "grouped_gemm",
            "layers.*.mlp.experts": "ep_dispatch_experts",
        }

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_intermediate_size: int = 1024
    expert_activation: str = "relu"
    moe_layers: str | int | list[int] = "all"
    router_type: str = "noisy_top_k"
    noise_epsilon: float | int = 1e-2
    importance_loss_coef: float | int = 0.1
    load_loss_coef: float | int = 0.1
    output_router_logits: bool = False
    expert_recompute_activations: bool = False
    router_statistics_scope: str = "global"
    num_expert_groups: int = 1
    num_groups_per_tok: int = 1
    batchwise_loss_coef: float | int = 0.01
    expert_capacity_factor: float | int | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # A plain ValueError here, before the parent sets up RoPE and the rest from these values; `@strict` runs the
        # same checks again after `__init__` (cheap) and from `validate()`, e.g. in `save_pretrained`.
        self.validate_moe_values()
        # As built-in configs (Llama, OLMoE) do: transformers' RoPE initializers for the scaled types ("dynamic",
        # "yarn", "longrope") read `config.head_dim` and fail on `None`.
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_moe_values(self) -> None:
        """Part of `@strict` validation (also run by `validate()` and `save_pretrained`, so a value changed after
        construction is checked before it is saved): reject every bad value, naming the field and the value."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "num_experts",
            "expert_intermediate_size",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}) when `head_dim` is not set."
            )
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2 != 0):
            raise ValueError(f"`head_dim` must be a positive even integer (RoPE), got {self.head_dim!r}.")
        if self.head_dim is None and (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"The head size hidden_size // num_attention_heads = {self.hidden_size // self.num_attention_heads} "
                f"(hidden_size={self.hidden_size}, num_attention_heads={self.num_attention_heads}) must be even "
                f"(RoPE rotates pairs of dimensions): change one of them or set an even `head_dim`."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by `num_key_value_heads` "
                f"({self.num_key_value_heads})."
            )
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` must be between 1 and `num_experts` ({self.num_experts}), "
                f"got {self.num_experts_per_tok!r}."
            )
        if self.expert_activation not in EXPERT_ACTIVATIONS:
            raise ValueError(
                f"`expert_activation` must be one of {EXPERT_ACTIVATIONS}, got {self.expert_activation!r}."
            )
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"`router_type` must be one of {ROUTER_TYPES}, got {self.router_type!r}.")
        if self.router_statistics_scope not in ROUTER_STATISTICS_SCOPES:
            raise ValueError(
                f"`router_statistics_scope` must be one of {ROUTER_STATISTICS_SCOPES}, "
                f"got {self.router_statistics_scope!r}."
            )
        self._check_router_values()
        for name in ("importance_loss_coef", "load_loss_coef"):
            value = getattr(self, name)
            if not 0 <= value < float("inf"):  # also rejects NaN
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        # SPEC §3: the noise scale divides the smooth load estimator's Phi argument and must never be zero; the
        # softplus term underflows to 0 for very negative x W_noise, so the floor itself must be positive.
        if not 0 < self.noise_epsilon < float("inf"):
            raise ValueError(f"`noise_epsilon` must be a finite number > 0, got {self.noise_epsilon!r}.")
        if not 0 <= self.attention_dropout <= 1:
            raise ValueError(f"`attention_dropout` must be a probability in [0, 1], got {self.attention_dropout!r}.")
        if not 0 < self.rms_norm_eps < float("inf"):
            raise ValueError(f"`rms_norm_eps` must be a finite number > 0, got {self.rms_norm_eps!r}.")
        # The std of the weights' normal init: torch rejects a negative or NaN one only when a model is built (without
        # naming the field), and an infinite one gives non-finite weights. (LlamaConfig: an interval validator.)
        if not 0 <= self.initializer_range < float("inf"):
            raise ValueError(f"`initializer_range` must be a finite number >= 0, got {self.initializer_range!r}.")
        self.moe_layer_indices  # noqa: B018 -- validates `moe_layers`

    def _check_router_values(self) -> None:
        """Hierarchical groups (SPEC §4), balanced gating (SPEC §5) and expert capacity."""
        if self.num_expert_groups < 1:
            raise ValueError(f"`num_expert_groups` must be a positive integer, got {self.num_expert_groups!r}.")
        if self.router_type == "hierarchical":
            if self.num_experts % self.num_expert_groups != 0:
                raise ValueError(
                    f"`num_experts` ({self.num_experts}) must be a multiple of `num_expert_groups` "
                    f"({self.num_expert_groups}) with router_type='hierarchical'."
                )
            if not 1 <= self.num_groups_per_tok <= self.num_expert_groups:
                raise ValueError(
                    f"`num_groups_per_tok` must be between 1 and `num_expert_groups` ({self.num_expert_groups}), "
                    f"got {self.num_groups_per_tok!r}."
                )
            group_size = self.num_experts // self.num_expert_groups
            if self.num_experts_per_tok > group_size:
                raise ValueError(
                    f"`num_experts_per_tok` ({self.num_experts_per_tok}) is kept within each group with "
                    f"router_type='hierarchical' and must be at most the group size "
                    f"num_experts // num_expert_groups = {group_size}."
                )
        else:
            for name in ("num_expert_groups", "num_groups_per_tok"):
                if getattr(self, name) != 1:
                    raise ValueError(
                        f"`{name}` must be 1 unless router_type='hierarchical', got {getattr(self, name)!r} "
                        f"with router_type={self.router_type!r}."
                    )
        if not 0 <= self.batchwise_loss_coef < float("inf"):
            raise ValueError(f"`batchwise_loss_coef` must be a finite number >= 0, got {self.batchwise_loss_coef!r}.")
        if self.expert_capacity_factor is not None and not 0 < self.expert_capacity_factor < float("inf"):
            raise ValueError(
                f"`expert_capacity_factor` must be a finite number > 0 or None, got {self.expert_capacity_factor!r}."
            )

    @property
    def experts_per_token(self) -> int:
        """Experts each token is sent to: `num_experts_per_tok`, times `num_groups_per_tok` for the hierarchical
        router (the balanced router sends `num_experts_per_tok` per token on average)."""
        return self.num_experts_per_tok * self.num_groups_per_tok

    @property
    def moe_layer_indices(self) -> list[int]:
        """The decoder layers whose feed-forward block is a MoE layer, resolved from `moe_layers`."""
        spec, num_layers = self.moe_layers, self.num_hidden_layers
        if isinstance(spec, str):
            if spec != "all":
                raise ValueError(
                    f"`moe_layers` must be 'all', a positive int or a list of layer indices, got {spec!r}."
                )
            return list(range(num_layers))
        if isinstance(spec, bool):
            raise ValueError(f"`moe_layers` must be 'all', a positive int or a list of layer indices, got {spec!r}.")
        if isinstance(spec, int):
            if not 1 <= spec <= num_layers:
                raise ValueError(
                    f"`moe_layers` as an int is the MoE period (every N-th layer) and must be between 1 and "
                    f"num_hidden_layers ({num_layers}), got {spec!r} (an empty list makes a dense model)."
                )
            return [i for i in range(num_layers) if i % spec == spec - 1]
        if not isinstance(spec, (list, tuple)):
            raise ValueError(f"`moe_layers` must be 'all', a positive int or a list of layer indices, got {spec!r}.")
        indices = list(spec)
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
                raise ValueError(
                    f"`moe_layers` entry {index!r} is not a layer index in [0, {num_layers}) "
                    f"(num_hidden_layers={num_layers})."
                )
        if len(set(indices)) != len(indices):
            raise ValueError(f"`moe_layers` has repeated layer indices: {indices!r}.")
        return sorted(indices)


__all__ = ["MoEConfig"]
