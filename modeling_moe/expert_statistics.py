"""Running expert-utilization statistics over several forward passes (for logging between Trainer logging steps)."""

from __future__ import annotations

import torch

from .gating import CV_EPSILON, RouterOutput, cv_squared


class ExpertStatistics:
    """Sums `Importance(X)`, `Load(X)` and the balancing losses of each MoE layer over forward passes.

    The CVs of the summed vectors describe the balance over all tokens seen since the last `pop`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.num_forwards = 0
        self.importance: list[torch.Tensor] = []  # per MoE layer, (num_experts,)
        self.load: list[torch.Tensor] = []
        self.tokens_per_expert: list[torch.Tensor] = []
        self.importance_loss = 0.0
        self.load_loss = 0.0
        # Optional per-layer statistics, keyed by the MoE layer's position: assignments dropped over capacity (summed)
        # and the balanced router's threshold agreement (summed, with the number of forwards that reported it).
        self.dropped_tokens: dict[int, torch.Tensor] = {}
        self.threshold_agreement: dict[int, tuple[torch.Tensor, int]] = {}

    @torch.no_grad()
    def add(self, router_outputs: tuple[RouterOutput, ...] | None) -> None:
        if not router_outputs:
            return
        # Totals stay on the device of their first forward's tensors (layers may sit on several devices, and a model
        # may move between forwards): what arrives is moved there (a no-op on the same device).
        if self.num_forwards == 0:
            self.importance = [r.importance.clone() for r in router_outputs]
            self.load = [r.load.clone() for r in router_outputs]
            self.tokens_per_expert = [r.tokens_per_expert.clone() for r in router_outputs]
            self.importance_loss = self.load_loss = router_outputs[0].importance_loss.new_zeros(())
        else:
            for i, r in enumerate(router_outputs):
                self.importance[i] += r.importance.to(self.importance[i].device)
                self.load[i] += r.load.to(self.load[i].device)
                self.tokens_per_expert[i] += r.tokens_per_expert.to(self.tokens_per_expert[i].device)
        device = self.importance_loss.device
        self.importance_loss = self.importance_loss + sum(r.importance_loss.detach().to(device) for r in router_outputs)
        self.load_loss = self.load_loss + sum(r.load_loss.detach().to(device) for r in router_outputs)
        for i, r in enumerate(router_outputs):
            if r.dropped_tokens is not None:
                self.dropped_tokens[i] = self.dropped_tokens.get(i, 0) + r.dropped_tokens
            if r.threshold_agreement is not None:
                total, count = self.threshold_agreement.get(i, (0, 0))
                self.threshold_agreement[i] = (total + r.threshold_agreement, count + 1)
        self.num_forwards += 1

    def summary(self, layer_indices: list[int]) -> dict[str, float]:
        """Mean losses per forward and, per MoE layer, CV(Importance), CV(Load), max/mean load; with expert capacity
        the assignments dropped (`dropped_tokens`, summed), with the balanced router `threshold_agreement` (mean)."""
        if self.num_forwards == 0:
            return {}
        result = {
            "importance_loss": float(self.importance_loss) / self.num_forwards,
            "load_loss": float(self.load_loss) / self.num_forwards,
        }
        for layer, importance, load in zip(layer_indices, self.importance, self.load, strict=True):
            result[f"layer_{layer}/cv_importance"] = float(cv_squared(importance).sqrt())
            result[f"layer_{layer}/cv_load"] = float(cv_squared(load).sqrt())
            result[f"layer_{layer}/max_mean_load"] = float(load.max() / (load.mean() + CV_EPSILON))
        for position, layer in enumerate(layer_indices):
            if position in self.dropped_tokens:  # only with `expert_capacity_factor`
                result[f"layer_{layer}/dropped_tokens"] = float(self.dropped_tokens[position])
            if position in self.threshold_agreement:  # only with the balanced router: mean over forwards
                total, count = self.threshold_agreement[position]
                result[f"layer_{layer}/threshold_agreement"] = float(total) / count
        return result

    def tokens_per_expert_by_layer(self) -> list[list[float]]:
        """Tokens each expert received since the last reset, one list per MoE layer."""
        return [t.tolist() for t in self.tokens_per_expert]

    def pop(self, layer_indices: list[int]) -> dict[str, float]:
        """`summary(layer_indices)`, then reset."""
        result = self.summary(layer_indices)
        self.reset()
        return result
