"""Strictly balanced gating of the sparsely-gated MoE layer (SPEC.md §5, paper appendix F).

Training: each of the `n` experts takes exactly `m` of the batch's non-padding tokens, those with its highest softmax
gate values (`M_batchwise`), and the gate values are renormalised over the experts that took the token. Inference
cannot see the batch, so a learned per-expert threshold `T` routes each token on its own (`M_threshold`); `T` is
trained with `L_batchwise` to make the threshold mask reproduce the batchwise one.

A token can get a variable number of experts. The router returns a fixed `K` slots per token (`K` = the most experts
any token of the call got): the token's experts first, then unused slots with weight 0 (their index is a valid expert,
so every experts implementation accepts it; a zero weight contributes nothing and passes no gradient, and the MoE block
turns it into the skipped sentinel id for the implementations that accept one, so it costs no expert compute).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .gating import RouterOutput, gate_linear, reduce_router_statistics

if TYPE_CHECKING:
    from .configuration_moe import MoEConfig


def batchwise_mask(gate_scores: torch.Tensor, token_mask: torch.Tensor, m: int) -> torch.Tensor:
    """`M_batchwise(X, m)` of SPEC §5: each expert (column) takes the `m` non-padding tokens with its highest gates.

    Args:
        gate_scores: `(num_tokens, num_experts)` softmax gate values `G_sigma(x)`, or their logarithm (the same
            order, without the underflow of small probabilities to 0, which would tie them).
        token_mask: `(num_tokens,)` bool, False on padding tokens (never taken).
        m: tokens per expert, at most the number of non-padding tokens.

    Returns:
        `(num_tokens, num_experts)` bool with exactly `m` True per column.
    """
    mask = torch.zeros_like(gate_scores, dtype=torch.bool)
    if m == 0:
        return mask
    scores = gate_scores.masked_fill(~token_mask.unsqueeze(-1), float("-inf"))
    return mask.scatter_(0, scores.topk(m, dim=0).indices, True)


class BalancedRouter(nn.Module):
    """Strictly balanced gate of SPEC §5 with the threshold routing used at inference.

    - `m = ceil(k * |X| / n)` tokens per expert in training (`|X|` non-padding tokens of the call). The ceiling keeps
      `n * m >= k * |X|` assignments and `m >= 1`; `m = k|X|/n` exactly when it divides.
    - `G(x)_i = G_sigma(x)_i M_{x,i} / sum_j G_sigma(x)_j M_{x,j}` with `M = M_batchwise` in training and
      `M = M_threshold` (`x W_g > T`) in evaluation; a token that passes no threshold goes to its top-`k` experts by
      `x W_g` instead (its softmax renormalised over them), so no token is left without an expert at inference. In
      training a token no expert took gets no expert (the residual connection carries it).
    - `L_batchwise` (coefficient `batchwise_loss_coef`) trains `T` and `W_g`; it is added to `load_loss`, since the
      batchwise mask makes `Load(X)` the constant `m` (so `CV(Load)^2 = 0`). `Importance(X)` enters
      `importance_loss` as in SPEC §3.
    - `threshold_agreement`: the fraction of non-padding tokens whose inference routing (thresholds and fallback)
      picks exactly the experts the batchwise mask of the same call picks.

    `W_g` (`weight`, `(num_experts, hidden_size)`) starts at small random values: at zero every gate ties and all
    experts would take the same `m` tokens. `T` (`threshold`, `(num_experts,)`) starts at zero.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        importance_loss_coef: float = 0.1,
        load_loss_coef: float = 0.1,
        batchwise_loss_coef: float = 0.01,
        statistics_scope: str = "global",
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"`top_k` must be between 1 and `num_experts` ({num_experts}), got {top_k}.")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.batchwise_loss_coef = batchwise_loss_coef
        self.statistics_scope = statistics_scope
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))  # W_g^T
        self.threshold = nn.Parameter(torch.zeros(num_experts))  # T

    @classmethod
    def from_config(cls, config: MoEConfig) -> BalancedRouter:
        return cls(
            hidden_size=config.hidden_size,
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            importance_loss_coef=config.importance_loss_coef,
            load_loss_coef=config.load_loss_coef,
            batchwise_loss_coef=config.batchwise_loss_coef,
            statistics_scope=config.router_statistics_scope,
        )

    def tokens_per_expert_in_training(self, num_tokens: int) -> int:
        """`m = ceil(k * num_tokens / n)`: the tokens each expert takes from a batch of `num_tokens` non-padding tokens."""
        return math.ceil(self.top_k * num_tokens / self.num_experts)

    def threshold_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Inference routing: `M_threshold(x, T)` (`x W_g > T`), or the top-k experts where no threshold is passed."""
        mask = logits > self.threshold.float()
        top_k = torch.zeros_like(mask).scatter_(-1, logits.topk(self.top_k, dim=-1).indices, True)
        return mask | (top_k & ~mask.any(dim=-1, keepdim=True))

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RouterOutput]:
        """Route `hidden_states` `(num_tokens, hidden_size)`; `token_mask` `(num_tokens,)` is 0 on padding tokens.

        Returns the clean logits `(num_tokens, n)`, `top_k_weights` / `top_k_index` `(num_tokens, K)` (unused slots
        have weight 0) and the [`RouterOutput`] (with `threshold_agreement` and `batchwise_loss`).
        """
        x = hidden_states.reshape(-1, self.hidden_size).float()
        logits = gate_linear(x, self.weight)  # (num_tokens, n)
        valid = torch.ones(x.size(0), dtype=torch.bool, device=x.device) if token_mask is None else token_mask.bool()
        valid = valid.reshape(-1)
        num_valid = int(valid.sum())

        with torch.no_grad():
            # Ranked by log G_sigma(x): float32 softmax values underflow to tied zeros for logit gaps above ~100.
            batch_mask = batchwise_mask(
                logits.log_softmax(dim=-1), valid, self.tokens_per_expert_in_training(num_valid)
            )
            inference_mask = self.threshold_mask(logits)
            raw_threshold_mask = logits > self.threshold.float()
        route_mask = batch_mask if self.training else inference_mask

        # G(x)_i = G_sigma(x)_i M_{x,i} / sum_j G_sigma(x)_j M_{x,j}: the softmax of x W_g over the token's experts
        # (computed as such, it never underflows to 0 for all of them); 0 for a token without experts (its row keeps
        # finite logits, so the softmax's backward has no NaN to multiply by the zero mask).
        has_expert = route_mask.any(dim=-1, keepdim=True)
        gates = logits.masked_fill(~route_mask & has_expert, float("-inf")).softmax(dim=-1) * route_mask
        num_slots = max(1, int(route_mask.sum(dim=-1).max())) if x.size(0) else 1
        # The chosen experts have the positive gates, so they come first; the remaining slots carry weight 0.
        top_k_weights, top_k_index = gates.topk(num_slots, dim=-1)
        top_k_weights = top_k_weights * route_mask.gather(1, top_k_index)

        token_weight = valid.to(x.dtype).unsqueeze(-1)
        importance = (gates * token_weight).sum(dim=0)
        tokens_per_expert = (route_mask * token_weight).sum(dim=0)
        # SPEC §5: L_batchwise = sum_x sum_i (M_threshold - M_batchwise)_{x,i} ((x W_g)_i - T_i), padding excluded.
        difference = (raw_threshold_mask.to(x.dtype) - batch_mask.to(x.dtype)) * token_weight
        batchwise_loss = self.batchwise_loss_coef * (difference * (logits - self.threshold.float())).sum()
        agreement = ((inference_mask == batch_mask).all(dim=-1) & valid).sum() / max(num_valid, 1)

        importance, load = reduce_router_statistics(importance, tokens_per_expert, scope=self.statistics_scope)
        router_output = RouterOutput.from_statistics(
            importance,
            load,
            tokens_per_expert,
            self.importance_loss_coef,
            self.load_loss_coef,
            threshold_agreement=agreement.detach(),
            batchwise_loss=batchwise_loss.detach(),
        )
        # With the batchwise mask CV(Load)^2 is 0; L_batchwise (SPEC §5) rides in the load loss.
        router_output.load_loss = router_output.load_loss + batchwise_loss
        return logits, top_k_weights, top_k_index, router_output


__all__ = ["BalancedRouter", "batchwise_mask"]
