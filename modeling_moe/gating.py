"""Gating networks and balancing losses of the sparsely-gated MoE layer (SPEC.md §2-§3).

Every router maps the tokens of a layer, `hidden_states` of shape `(num_tokens, hidden_size)`, to
`(router_logits, top_k_weights, top_k_index, router_output)`:

- `router_logits` `(num_tokens, num_experts)`: the clean logits `x @ W_g`;
- `top_k_weights` `(num_tokens, k)`: the non-zero gate values `G(x)_i`, in the order of `top_k_index`;
- `top_k_index` `(num_tokens, k)`: the experts those values belong to;
- `router_output`: a [`RouterOutput`] with the layer's balancing losses and statistics.

The gate is computed in float32 whatever the model's dtype, so fp16/bf16 models route like fp32 ones, and whether or not
`torch.autocast` is on (as under `Trainer(bf16=True)`), which would run its matmuls in bf16/fp16 (`gate_linear`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .configuration_moe import MoEConfig

# SPEC §3: the reference implementation divides by `mean^2 + 1e-10`.
CV_EPSILON = 1e-10
# |z| beyond which the standard normal CDF is 0 or 1 and its density 0 in float32 and float64 (load_probability).
_PHI_SATURATION = 40.0


def gate_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` in float32, also where `torch.autocast` is on for `x`'s device, which would run `F.linear` in its
    lower precision (and, on CUDA, the softmax after it in float32: the routers' `scatter` of float32 gate values into
    bf16 logits' shape would then fail with a dtype mismatch)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return F.linear(x.float(), weight.float())
    return F.linear(x.float(), weight.float())


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last dimension: `var / (mean^2 + 1e-10)` (population var, SPEC §3)."""
    values = values.float()
    mean = values.mean(dim=-1)
    variance = values.var(dim=-1, unbiased=False) if values.size(-1) > 1 else torch.zeros_like(mean)
    return variance / (mean.square() + CV_EPSILON)


def kth_excluding(values: torch.Tensor, k: int) -> torch.Tensor:
    """`kth_excluding(v, k, i)` of SPEC §3 for every `i` at once.

    Args:
        values: `(num_tokens, num_experts)`.
        k: the number of experts kept, `1 <= k <= num_experts`.

    Returns:
        `(num_tokens, num_experts)`: entry `[t, i]` is the k-th largest of `values[t]` with entry `i` left out; `-inf`
        where that does not exist (`k == num_experts`, `i` inside the top k). For an `i` inside the top k this is the
        (k+1)-th largest value, else the k-th largest. Membership is decided by index, not by value, so ties are exact.
    """
    num_experts = values.size(-1)
    if not 1 <= k <= num_experts:
        raise ValueError(f"`k` must be between 1 and the number of experts ({num_experts}), got {k}.")
    top_values, top_index = values.topk(min(k + 1, num_experts), dim=-1)  # (num_tokens, k or k+1)
    in_top_k = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, top_index[..., :k], True)
    threshold_if_out = top_values[..., k - 1 : k]  # the k-th largest
    if k < num_experts:
        threshold_if_in = top_values[..., k : k + 1]  # the (k+1)-th largest
    else:
        threshold_if_in = torch.full_like(threshold_if_out, float("-inf"))
    return torch.where(in_top_k, threshold_if_in, threshold_if_out)


def load_probability(
    clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: torch.Tensor, k: int
) -> torch.Tensor:
    """Smooth load estimator of SPEC §3: `P(x, i) = Phi((clean_i - kth_excluding(H(x), k, i)) / sigma_i)`.

    `P(x, i)` is the probability that expert `i` stays in the top k when only its own noise is redrawn.

    Args:
        clean_logits: `(num_tokens, num_experts)`, `x @ W_g`.
        noisy_logits: `(num_tokens, num_experts)`, `H(x)`.
        noise_std: `(num_tokens, num_experts)`, the standard deviation of the noise that was added (> 0).
        k: the number of experts kept; must be below the number of experts (else `P == 1`).

    Returns:
        `(num_tokens, num_experts)` probabilities, differentiable in all three inputs.
    """
    threshold = kth_excluding(noisy_logits, k)  # (num_tokens, num_experts)
    # Phi is exactly 0 or 1, with zero derivative, beyond |z| = 40 (float32 and float64): clamping the difference
    # there changes no value, and keeps the division's backward (-grad * z / sigma) from 0 * inf = NaN where sigma^2
    # underflows (a tiny `noise_epsilon` with softplus(x W_noise) underflowing to 0).
    bound = _PHI_SATURATION * noise_std.detach()
    return torch.special.ndtr((clean_logits - threshold).clamp(-bound, bound) / noise_std)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks whose backward is also a sum over the ranks.

    Every rank's loss depends on the summed statistics, so the gradient reaching one rank's own contribution is the sum
    of the gradients of all ranks' losses (`torch.distributed.nn.functional.all_reduce` does the same but is
    deprecated).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


# Set while a training forward runs without autograd on every rank all the same: the first pass of reentrant gradient
# checkpointing, which runs each layer under `torch.no_grad()` and again with autograd in backward.
_TRAINING_WITHOUT_AUTOGRAD = contextvars.ContextVar("moe_training_without_autograd", default=False)


@contextlib.contextmanager
def training_forward_without_autograd() -> Iterator[None]:
    """Make `reduce_router_statistics` sum over the ranks inside this block even without autograd. For the first pass
    of reentrant gradient checkpointing, a training forward that every rank runs: without it the losses and statistics
    that forward returns (the logged ones) would be each rank's own batch's."""
    token = _TRAINING_WITHOUT_AUTOGRAD.set(True)
    try:
        yield
    finally:
        _TRAINING_WITHOUT_AUTOGRAD.reset(token)


def reduce_router_statistics(
    *statistics: torch.Tensor, scope: str = "global", group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, ...]:
    """Per-expert statistics (`Importance(X)`, `Load(X)`, ...) over the global batch, before any CV (SPEC §3).

    With `scope="global"`, `torch.distributed` initialized with more than one rank and gradients enabled, each tensor
    is summed over the ranks of `group` (all ranks by default: every rank holds its own data-parallel batch, as under
    DDP, FSDP and the expert parallelism of `DistributedConfig`) in one collective, with gradients flowing back to
    every rank's tokens. Otherwise (`scope="local"`, a single process, or under `torch.no_grad()`, where there is no
    gradient to share and a collective would hang a rank that generates alone; except inside
    `training_forward_without_autograd`) the tensors come back unchanged.
    Every rank must call it the same number of times: routers call it once per forward, in every MoE layer.
    """
    if scope not in ("global", "local"):
        raise ValueError(f"`scope` must be 'global' or 'local', got {scope!r}.")
    if (
        scope == "local"
        or not dist.is_available()
        or not dist.is_initialized()
        or dist.get_world_size(group) < 2
        or not (torch.is_grad_enabled() or _TRAINING_WITHOUT_AUTOGRAD.get())  # last: `torch.compile` can't read it
    ):
        return statistics
    sizes = [t.numel() for t in statistics]
    flat = torch.cat([t.float().reshape(-1) for t in statistics])  # one collective for all statistics
    flat = _AllReduceSum.apply(flat, group)
    return tuple(part.view_as(t) for part, t in zip(flat.split(sizes), statistics, strict=True))


@dataclass
class RouterOutput:
    """Balancing losses and expert statistics of one MoE layer for one forward pass.

    `importance_loss` and `load_loss` are already multiplied by their coefficients and carry gradients; the rest is
    detached and meant for logging. `importance` and `load` are `Importance(X)` and `Load(X)` of SPEC §3 over the
    non-padding tokens, of all ranks when `reduce_router_statistics` summed them (`load` is the smooth estimate in
    training with noise, the token count otherwise); `tokens_per_expert` counts the (non-padding) tokens each expert
    actually received (this rank's).

    Optional fields (`None` where they do not apply): `dropped_tokens`, the (token, expert) assignments that went over
    an expert's capacity (`expert_capacity_factor`) and were skipped; `threshold_agreement`, for the balanced router
    (SPEC §5), the fraction of non-padding tokens whose threshold-mask experts equal their batchwise-mask experts;
    `batchwise_loss`, the balanced router's `L_batchwise` (coefficient applied, already inside `load_loss`).
    """

    importance_loss: torch.Tensor
    load_loss: torch.Tensor
    importance: torch.Tensor
    load: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor | None = None
    threshold_agreement: torch.Tensor | None = None
    batchwise_loss: torch.Tensor | None = None

    @classmethod
    def from_statistics(
        cls,
        importance: torch.Tensor,
        load: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        importance_loss_coef: float,
        load_loss_coef: float,
        **optional_fields: torch.Tensor,
    ) -> RouterOutput:
        """The balancing losses of SPEC §3 from `Importance(X)` and `Load(X)`, and the detached statistics."""
        return cls(
            importance_loss=importance_loss_coef * cv_squared(importance),
            load_loss=load_loss_coef * cv_squared(load),
            importance=importance.detach(),
            load=load.detach(),
            tokens_per_expert=tokens_per_expert.detach(),
            **optional_fields,
        )

    @property
    def aux_loss(self) -> torch.Tensor:
        return self.importance_loss + self.load_loss

    @property
    def cv_importance(self) -> torch.Tensor:
        return cv_squared(self.importance).sqrt()

    @property
    def cv_load(self) -> torch.Tensor:
        return cv_squared(self.load).sqrt()

    @property
    def max_mean_load(self) -> torch.Tensor:
        return self.load.max() / (self.load.mean() + CV_EPSILON)


class TopKRouter(nn.Module):
    """Top-k gate of SPEC §2, noisy (`noisy=True`, the paper's gate) or not (softmax top-k).

    `W_g` (`weight`) and `W_noise` (`noise_weight`) are stored as `(num_experts, hidden_size)`, like `nn.Linear`, and
    start at zero, so routing at step 0 is decided by the noise alone.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        noisy: bool = True,
        noise_epsilon: float = 1e-2,
        importance_loss_coef: float = 0.1,
        load_loss_coef: float = 0.1,
        statistics_scope: str = "global",
    ):
        super().__init__()
        if noisy and not 0 < noise_epsilon < float("inf"):
            # SPEC §3: the smooth load estimator divides by the noise scale, which this floor keeps above zero.
            raise ValueError(f"`noise_epsilon` must be a finite number > 0, got {noise_epsilon!r}.")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.noisy = noisy
        self.noise_epsilon = noise_epsilon
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.statistics_scope = statistics_scope
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))  # W_g^T
        if noisy:
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))  # W_noise^T

    def gate_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Clean logits `x W_g`, noisy logits `H(x)` and the noise scale (`None` without noise) of SPEC §2.

        `x` is float32 `(num_tokens, hidden_size)`; the outputs are `(num_tokens, num_experts)`. Also used by the
        hierarchical router (SPEC §4) for its primary and secondary gates.
        """
        clean_logits = gate_linear(x, self.weight)  # (num_tokens, num_experts)
        if not (self.noisy and self.training):
            return clean_logits, clean_logits, None
        # SPEC §2: H(x) = x W_g + eps * (softplus(x W_noise) + noise_epsilon), eps ~ N(0, 1), training only.
        noise_std = F.softplus(gate_linear(x, self.noise_weight)) + self.noise_epsilon
        return clean_logits, clean_logits + torch.randn_like(clean_logits) * noise_std, noise_std

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RouterOutput]:
        """Route `hidden_states` `(num_tokens, hidden_size)`; `token_mask` `(num_tokens,)` is 0 on padding tokens."""
        x = hidden_states.reshape(-1, self.hidden_size).float()
        clean_logits, noisy_logits, noise_std = self.gate_logits(x)
        add_noise = noise_std is not None

        # G(x) = softmax(KeepTopK(H(x), k)): the softmax over the k kept logits equals the masked softmax.
        top_k_logits, top_k_index = noisy_logits.topk(self.top_k, dim=-1)  # (num_tokens, k)
        top_k_weights = top_k_logits.softmax(dim=-1)  # (num_tokens, k)

        if token_mask is None:
            token_mask = x.new_ones(x.size(0))
        token_mask = token_mask.reshape(-1, 1).to(x.dtype)  # (num_tokens, 1)

        gates = torch.zeros_like(clean_logits).scatter(1, top_k_index, top_k_weights)  # (num_tokens, num_experts)
        selected = torch.zeros_like(clean_logits).scatter(1, top_k_index, 1.0)  # (num_tokens, num_experts)
        tokens_per_expert = (selected * token_mask).sum(dim=0)  # (num_experts,)
        importance = (gates * token_mask).sum(dim=0)  # SPEC §3 Importance(X)
        if add_noise and self.top_k < self.num_experts:
            load = (load_probability(clean_logits, noisy_logits, noise_std, self.top_k) * token_mask).sum(dim=0)
        else:
            # No noise (evaluation, softmax gate) or every expert kept: Load(X) is the plain token count.
            load = tokens_per_expert

        # SPEC §3: under data parallelism, Importance and Load are over the global batch (summed over the ranks).
        importance, load = reduce_router_statistics(importance, load, scope=self.statistics_scope)
        router_output = RouterOutput.from_statistics(
            importance, load, tokens_per_expert, self.importance_loss_coef, self.load_loss_coef
        )
        return clean_logits, top_k_weights, top_k_index, router_output


def router_from_config(config: MoEConfig) -> nn.Module:
    """The router of one MoE layer, as `config.router_type` says."""
    if config.router_type in ("noisy_top_k", "softmax_top_k"):
        return TopKRouter(
            hidden_size=config.hidden_size,
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            noisy=config.router_type == "noisy_top_k",
            noise_epsilon=config.noise_epsilon,
            importance_loss_coef=config.importance_loss_coef,
            load_loss_coef=config.load_loss_coef,
            statistics_scope=config.router_statistics_scope,
        )
    # Imported here: both modules import this one (relative imports, so they travel as remote code).
    if config.router_type == "hierarchical":
        from .hierarchical_gating import HierarchicalRouter

        return HierarchicalRouter.from_config(config)
    if config.router_type == "balanced":
        from .balanced_gating import BalancedRouter

        return BalancedRouter.from_config(config)
    raise ValueError(f"Unknown `router_type` {config.router_type!r}.")


def expert_capacity(capacity_factor: float, experts_per_token: int, num_tokens: int, num_experts: int) -> int:
    """Tokens one expert may take: `ceil(capacity_factor * experts_per_token * num_tokens / num_experts)`."""
    return math.ceil(capacity_factor * experts_per_token * num_tokens / num_experts)


def apply_expert_capacity(
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    capacity: int,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Skip the assignments that go over an expert's capacity: their weight becomes 0 (the residual carries the token).

    An expert takes its assignments in order of choice rank first (every token's first choice before any second
    choice), then token order. Slots with weight exactly 0 (the balanced router's unused slots) and padding tokens
    (`token_mask == 0`) occupy no capacity and are never dropped.

    Args:
        top_k_index, top_k_weights: `(num_tokens, K)`, as the routers return them.
        num_experts: `n`.
        capacity: tokens one expert may take (see [`expert_capacity`]).
        token_mask: `(num_tokens,)`, 0 on padding tokens.

    Returns:
        `(top_k_weights, dropped_tokens, tokens_per_expert)`: the weights with dropped slots zeroed (differentiable),
        the number of dropped assignments (scalar) and the assignments each expert kept `(num_experts,)`.
    """
    if capacity < 0:
        raise ValueError(f"`capacity` must be >= 0, got {capacity}.")
    num_tokens, slots = top_k_index.shape
    occupies = top_k_weights.detach() != 0
    if token_mask is not None:
        occupies = occupies & token_mask.reshape(-1, 1).bool()
    # Choice-rank-major order: (K, num_tokens) flattened; slots that occupy nothing go to a sentinel expert `n`.
    experts = torch.where(occupies, top_k_index, num_experts).t().reshape(-1)
    order = torch.sort(experts, stable=True).indices
    sorted_experts = experts[order]
    counts = torch.bincount(sorted_experts, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(experts)
    rank[order] = torch.arange(experts.numel(), device=experts.device) - starts[sorted_experts]
    keep = ((rank < capacity) | (experts == num_experts)).reshape(slots, num_tokens).t()  # (num_tokens, K)
    dropped = (occupies & ~keep).sum()
    kept = occupies & keep
    tokens_per_expert = torch.zeros(num_experts, device=top_k_index.device).index_add_(
        0, top_k_index[kept], torch.ones(int(kept.sum()), device=top_k_index.device)
    )
    return top_k_weights * keep.to(top_k_weights.dtype), dropped, tokens_per_expert


def limit_expert_capacity(
    router_output: RouterOutput,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    capacity_factor: float,
    experts_per_token: int,
    num_experts: int,
    token_mask: torch.Tensor | None = None,
    training: bool = True,
) -> torch.Tensor:
    """`expert_capacity_factor` of a MoE layer: in training, skip the assignments over each expert's capacity.

    The capacity is [`expert_capacity`] of the call's non-padding tokens. Sets `router_output.dropped_tokens` (0 in
    evaluation, which never drops a token so that cached and uncached generation agree) and, in training,
    `router_output.tokens_per_expert` to the tokens the experts kept. Returns the (possibly zeroed) weights.
    """
    if not training:
        router_output.dropped_tokens = torch.zeros((), dtype=torch.long, device=top_k_index.device)
        return top_k_weights
    num_tokens = top_k_index.size(0) if token_mask is None else int(token_mask.sum())
    capacity = expert_capacity(capacity_factor, experts_per_token, num_tokens, num_experts)
    top_k_weights, dropped, tokens_per_expert = apply_expert_capacity(
        top_k_index, top_k_weights, num_experts, capacity, token_mask
    )
    router_output.dropped_tokens = dropped
    router_output.tokens_per_expert = tokens_per_expert
    return top_k_weights
