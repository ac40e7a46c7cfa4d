"""Gating networks and balancing losses of the sparsely-gated MoE layer (SPEC.md §2-§3).

Every router maps the tokens of a layer, `hidden_states` of shape `(num_tokens, hidden_size)`, to
`(router_logits, top_k_weights, top_k_index, router_output)`:

- `router_logits` `(num_tokens, num_experts)`: the clean logits `x @ W_g`;
- `top_k_weights` `(num_tokens, k)`: the non-zero gate values `G(x)_i`, in the order of `top_k_index`;
- `top_k_index` `(num_tokens, k)`: the experts those values belong to;
- `router_output`: a [`RouterOutput`] with the layer's balancing losses and statistics.

The gate is computed in float32 whatever the model's dtype, so fp16/bf16 models route like fp32 ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# SPEC §3: the reference implementation divides by `mean^2 + 1e-10`.
CV_EPSILON = 1e-10


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
    return torch.special.ndtr((clean_logits - threshold) / noise_std)


@dataclass
class RouterOutput:
    """Balancing losses and expert statistics of one MoE layer for one forward pass.

    `importance_loss` and `load_loss` are already multiplied by their coefficients and carry gradients; the rest is
    detached and meant for logging. `importance` and `load` are `Importance(X)` and `Load(X)` of SPEC §3 over the
    non-padding tokens (`load` is the smooth estimate in training with noise, the token count otherwise);
    `tokens_per_expert` counts the (non-padding) tokens each expert actually received.
    """

    importance_loss: torch.Tensor
    load_loss: torch.Tensor
    importance: torch.Tensor
    load: torch.Tensor
    tokens_per_expert: torch.Tensor

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
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.noisy = noisy
        self.noise_epsilon = noise_epsilon
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))  # W_g^T
        if noisy:
            self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size))  # W_noise^T

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RouterOutput]:
        """Route `hidden_states` `(num_tokens, hidden_size)`; `token_mask` `(num_tokens,)` is 0 on padding tokens."""
        x = hidden_states.reshape(-1, self.hidden_size).float()
        clean_logits = F.linear(x, self.weight.float())  # (num_tokens, num_experts)
        add_noise = self.noisy and self.training
        if add_noise:
            # SPEC §2: H(x) = x W_g + eps * (softplus(x W_noise) + noise_epsilon), eps ~ N(0, 1), training only.
            noise_std = F.softplus(F.linear(x, self.noise_weight.float())) + self.noise_epsilon
            noisy_logits = clean_logits + torch.randn_like(clean_logits) * noise_std
        else:
            noisy_logits = clean_logits

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

        router_output = RouterOutput(
            importance_loss=self.importance_loss_coef * cv_squared(importance),
            load_loss=self.load_loss_coef * cv_squared(load),
            importance=importance.detach(),
            load=load.detach(),
            tokens_per_expert=tokens_per_expert.detach(),
        )
        return clean_logits, top_k_weights, top_k_index, router_output


def router_from_config(config) -> nn.Module:
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
        )
    raise ValueError(f"Unknown `router_type` {config.router_type!r}.")
