"""Hierarchical gating of the sparsely-gated MoE layer (SPEC.md §4, paper appendix B).

A primary noisy top-k gate chooses `k1` of `a` groups; in each chosen group `i` a secondary noisy top-k gate `G_i`
chooses `k2` of its `b` experts; the gate value of expert `(i, j)` is `G_primary(x)_i * G_i(x)_j`. The `a * b` experts
are numbered `i * b + j` and live in the same fused experts module as with the flat router, so the router returns the
same `(router_logits, top_k_weights, top_k_index, router_output)` as [`TopKRouter`], with `k1 * k2` slots per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .gating import RouterOutput, TopKRouter, load_probability, reduce_router_statistics

if TYPE_CHECKING:
    from .configuration_moe import MoEConfig


class HierarchicalRouter(nn.Module):
    """Two-level noisy top-k gate of SPEC §4 over `num_groups * group_size` experts.

    Both levels are [`TopKRouter`] gates (the same noise, `W_g` / `W_noise` at zero at the start): `primary` over the
    `a` groups, and `secondary`, whose `(a * b, hidden_size)` matrices stack the `a` group gates `G_i` (rows
    `i * b ... i * b + b - 1` are group `i`'s). The secondary logits are computed for every group in one matmul (the
    gate is small next to the experts), but each group's gate only counts the tokens the primary gate sent to it.

    Balancing losses (SPEC §4 with §3's CV² and coefficients), over the non-padding tokens `X`:

        Importance_H(X)_{i,j} = sum_x G_primary(x)_i * G_i(x)_j
        Load_H(X)_{i,j}       = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|,   X^(i) = {x : G_primary(x)_i > 0}

    with `Load_H(X)_{i,j} = 0` where `X^(i)` is empty (then `Load_i(X^(i))` is an empty sum too).
    """

    def __init__(
        self,
        hidden_size: int,
        num_groups: int,
        group_size: int,
        groups_per_token: int,
        experts_per_group: int,
        noise_epsilon: float = 1e-2,
        importance_loss_coef: float = 0.1,
        load_loss_coef: float = 0.1,
        statistics_scope: str = "global",
    ):
        super().__init__()
        if not 1 <= groups_per_token <= num_groups:
            raise ValueError(
                f"`groups_per_token` must be between 1 and `num_groups` ({num_groups}), got {groups_per_token}."
            )
        if not 1 <= experts_per_group <= group_size:
            raise ValueError(
                f"`experts_per_group` must be between 1 and `group_size` ({group_size}), got {experts_per_group}."
            )
        self.hidden_size = hidden_size
        self.num_groups = num_groups
        self.group_size = group_size
        self.groups_per_token = groups_per_token
        self.experts_per_group = experts_per_group
        self.num_experts = num_groups * group_size
        self.top_k = groups_per_token * experts_per_group  # slots per token in `top_k_index`
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.statistics_scope = statistics_scope
        # The balancing losses are computed here from Importance_H / Load_H, so the sub-gates' own are unused.
        self.primary = TopKRouter(hidden_size, num_groups, groups_per_token, noisy=True, noise_epsilon=noise_epsilon)
        self.secondary = TopKRouter(
            hidden_size, self.num_experts, experts_per_group, noisy=True, noise_epsilon=noise_epsilon
        )

    @classmethod
    def from_config(cls, config: MoEConfig) -> HierarchicalRouter:
        return cls(
            hidden_size=config.hidden_size,
            num_groups=config.num_expert_groups,
            group_size=config.num_experts // config.num_expert_groups,
            groups_per_token=config.num_groups_per_tok,
            experts_per_group=config.num_experts_per_tok,
            noise_epsilon=config.noise_epsilon,
            importance_loss_coef=config.importance_loss_coef,
            load_loss_coef=config.load_loss_coef,
            statistics_scope=config.router_statistics_scope,
        )

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RouterOutput]:
        """Route `hidden_states` `(num_tokens, hidden_size)`; `token_mask` `(num_tokens,)` is 0 on padding tokens.

        Returns `router_logits` `(num_tokens, a * b)` (the clean secondary logits of every group), `top_k_weights` and
        `top_k_index` `(num_tokens, k1 * k2)` (flat expert ids `i * b + j`, grouped by chosen group), and the
        [`RouterOutput`] with `Importance_H` as `importance` and `Load_H` as `load`.
        """
        a, b, k1, k2 = self.num_groups, self.group_size, self.groups_per_token, self.experts_per_group
        x = hidden_states.reshape(-1, self.hidden_size).float()
        num_tokens = x.size(0)
        # Secondary noise is drawn first, so a single group reproduces the flat router's random stream exactly.
        secondary_clean, secondary_noisy, secondary_std = self.secondary.gate_logits(x)  # (num_tokens, a * b)
        primary_clean, primary_noisy, primary_std = self.primary.gate_logits(x)  # (num_tokens, a)

        # Each level: G(x) = softmax(KeepTopK(H(x), k)) (SPEC §2).
        primary_top_logits, group_index = primary_noisy.topk(k1, dim=-1)  # (num_tokens, k1)
        primary_weights = primary_top_logits.softmax(dim=-1)
        secondary_noisy = secondary_noisy.view(num_tokens, a, b)
        secondary_top_logits, expert_in_group = secondary_noisy.topk(k2, dim=-1)  # (num_tokens, a, k2)
        secondary_weights = secondary_top_logits.softmax(dim=-1)

        # Only the chosen groups' secondary gates are used: y_H = sum_i sum_j G_primary(x)_i G_i(x)_j E_{i,j}(x).
        chosen = group_index.unsqueeze(-1).expand(-1, -1, k2)  # (num_tokens, k1, k2)
        chosen_weights = secondary_weights.gather(1, chosen)
        chosen_experts = expert_in_group.gather(1, chosen) + chosen * b
        top_k_weights = (primary_weights.unsqueeze(-1) * chosen_weights).reshape(num_tokens, k1 * k2)
        top_k_index = chosen_experts.reshape(num_tokens, k1 * k2)

        if token_mask is None:
            token_mask = x.new_ones(num_tokens)
        token_mask = token_mask.reshape(-1, 1).to(x.dtype)  # (num_tokens, 1)

        gates = x.new_zeros(num_tokens, a * b).scatter(1, top_k_index, top_k_weights)  # float32, as the gate
        selected = x.new_zeros(num_tokens, a * b).scatter(1, top_k_index, 1.0)
        tokens_per_expert = (selected * token_mask).sum(dim=0)
        importance = (gates * token_mask).sum(dim=0)  # Importance_H, flattened (a * b,)

        # X^(i): the non-padding tokens the primary gate sent to group i.
        in_group = torch.zeros_like(primary_clean).scatter(1, group_index, 1.0) * token_mask  # (num_tokens, a)
        group_tokens = in_group.sum(dim=0)  # |X^(i)|
        if primary_std is not None and k1 < a:
            primary_load = (load_probability(primary_clean, primary_noisy, primary_std, k1) * token_mask).sum(dim=0)
        else:  # no noise (evaluation) or every group kept: Load_primary is the token count
            primary_load = group_tokens
        if secondary_std is not None and k2 < b:
            secondary_probability = load_probability(
                secondary_clean.view(num_tokens, a, b), secondary_noisy, secondary_std.view(num_tokens, a, b), k2
            )
        else:
            secondary_probability = torch.zeros_like(secondary_noisy).scatter(2, expert_in_group, 1.0)
        secondary_load = (secondary_probability * in_group.unsqueeze(-1)).sum(dim=0)  # Load_i(X^(i))_j, (a, b)

        # SPEC §3: over the global batch under data parallelism (each part summed over the ranks, then combined).
        importance, primary_load, secondary_load, group_tokens = reduce_router_statistics(
            importance, primary_load, secondary_load, group_tokens, scope=self.statistics_scope
        )
        # An empty X^(i) has Load_i(X^(i)) = 0; dividing by max(|X^(i)|, 1) keeps Load_H finite (0) there.
        load = (primary_load.unsqueeze(-1) * secondary_load / group_tokens.clamp(min=1).unsqueeze(-1)).reshape(-1)

        router_output = RouterOutput.from_statistics(
            importance, load, tokens_per_expert, self.importance_loss_coef, self.load_loss_coef
        )
        return secondary_clean, top_k_weights, top_k_index, router_output


__all__ = ["HierarchicalRouter"]
