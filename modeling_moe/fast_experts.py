"""A fast experts implementation: sorted dispatch, one grouped matmul per projection, hand-written backward.

SPEC §6 ("shrinking batch"): an expert sees about `k * tokens / n` rows, and small per-expert matmuls run far below
the hardware's matmul speed. This module gathers every token-expert pair sorted by expert and runs each projection as
*one* grouped matmul over all experts (`torch.nn.functional.grouped_mm` where the device and dtype support it, else one
`torch.bmm` over per-expert batches padded to the largest expert's load). A custom `torch.autograd.Function` writes each
weight gradient once, as the grouped product itself (no per-expert full-size zero gradient), keeps only the expert
hidden activations for backward (or none of them, with `recompute_activations=True`: they are recomputed in backward,
SPEC §6 "activation recomputation"), and needs no copy of the expert outputs for the routing-weight gradient
(`d w_{t,e} = <W_down[e]^T g_t, h_{t,e}>`).

It is registered in transformers' experts interface under `"moe_fused"`, so any class decorated with
`@use_experts_implementation` (ours, or e.g. OLMoE's) can select it with
`from_pretrained(..., experts_implementation="moe_fused")` or `model.set_experts_implementation("moe_fused")`.
Expert-parallel sentinels (expert ids `>= num_experts`: "expert on another rank") contribute zero, as in
`transformers.integrations.moe`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

FAST_EXPERTS_IMPLEMENTATION = "moe_fused"

# Cost, in padded rows, of copying one expert's weights for an overflow bucket (a 2-D weight copy moves about as many
# bytes as ~16-32 rows cost in FLOPs at matmul speed on a CPU); keeps buckets from splitting off for a few rows.
_BUCKET_COPY_ROWS = 32


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (8, 0):
        return False
    # The kernels want 16-byte aligned strides and base pointers.
    align = 16 // a.element_size()
    for t in (a, b):
        if t.data_ptr() % 16 != 0 or any(
            s % align != 0 for s, n in zip(t.stride(), t.shape, strict=True) if s != 1 and n > 1
        ):
            return False
    return True


class _Dispatch:
    """Token-expert pairs grouped by expert into a flat buffer of `num_rows` rows, and the matmuls over it.

    Two layouts. *grouped* (CUDA, where `grouped_mm` is a real grouped kernel): the pairs sorted by expert, one
    `grouped_mm` per product. *padded* (CPU, or where `grouped_mm` is unavailable; on CPU `grouped_mm` is a loop of
    small matmuls, the shrinking-batch problem of SPEC §6): bucket 0 holds every expert's first `C0` rows as one
    `(n, C0, d)` batch that multiplies the weights in place (no copy), and bucket 1 the overflow rows of the experts
    holding more than `C0`, as `(m, C1, d)` against a copy of just those experts' weights; `C0` minimises the padded
    rows plus the copies. Padding rows are zero on the inputs of every product, so they add nothing to any result.
    Pairs routed to a sentinel id (`>= n`, expert-parallel: "expert on another rank") are dropped.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, example: torch.Tensor, weight: torch.Tensor):
        self.num_tokens, self.top_k = top_k_index.shape
        self.num_experts = num_experts
        device = top_k_index.device
        expert_ids = top_k_index.reshape(-1)
        self.num_pairs = expert_ids.numel()
        sorted_ids, perm = torch.sort(expert_ids, stable=True)
        # Sentinels (ids >= n) all land in the extra bin n, which is then dropped.
        counts = torch.bincount(sorted_ids.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
        self.offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        self.num_valid = int(self.offsets[-1])
        self.perm = perm[: self.num_valid]  # flat pair index (token * k + slot) of each row, sorted by expert
        self.token = self.perm // self.top_k
        # grouped_mm on CUDA is a real grouped kernel for bf16 (SM80+); elsewhere it loops over small matmuls.
        self.grouped = (
            example.device.type == "cuda"
            and example.dtype == torch.bfloat16
            and _grouped_mm_ok(example, weight.transpose(1, 2))
        )
        self._weight_copies: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}
        if self.grouped:
            self.num_rows, self.position = self.num_valid, None
            self.row_token = self.token
            self.pair_row = torch.empty_like(perm)
            self.pair_row[self.perm] = torch.arange(self.num_valid, device=device)
            return
        counts_list = counts.tolist()
        max_count = max(counts_list, default=0)
        # Choose C0 among the distinct loads: cost = n * C0 + m(C0) * (max - C0 + copy), m(C0) = #experts above C0.
        best_cost, c0 = num_experts * max_count, max_count
        for cap in sorted(set(counts_list)):
            above = sum(1 for c in counts_list if c > cap)
            cost = num_experts * cap + above * (max_count - cap + _BUCKET_COPY_ROWS)
            if cost < best_cost:
                best_cost, c0 = cost, cap
        self.capacity0, self.capacity1 = c0, max_count - c0
        self.overflow = torch.tensor([e for e, c in enumerate(counts_list) if c > c0], device=device, dtype=torch.long)
        num_overflow = self.overflow.numel()
        self.num_rows = num_experts * c0 + num_overflow * self.capacity1
        # Row of every sorted pair in the padded buffer.
        expert = torch.repeat_interleave(torch.arange(num_experts, device=device), counts)
        rank = torch.arange(self.num_valid, device=device) - (self.offsets.long() - counts)[expert]
        slot = torch.full((num_experts,), -1, device=device, dtype=torch.long)
        slot[self.overflow] = torch.arange(num_overflow, device=device)
        self.position = torch.where(
            rank < c0,
            expert * c0 + rank,
            num_experts * c0 + slot[expert] * self.capacity1 + (rank - c0),
        )
        # Token of every buffer row; padding rows read the zero row appended after the last token.
        self.row_token = torch.full((self.num_rows,), self.num_tokens, device=device, dtype=torch.long)
        self.row_token[self.position] = self.token
        # Buffer row of every (token, slot) pair, for the way back (sentinel pairs: see `scatter_sum`).
        self.pair_row = torch.zeros(self.num_pairs, device=device, dtype=torch.long)
        self.pair_row[self.perm] = self.position

    def gather(self, source: torch.Tensor) -> torch.Tensor:
        """Buffer rows `(num_rows, d)` from per-token `source` `(num_tokens, d)` in one gather (zero padding)."""
        if self.position is None:
            return source.index_select(0, self.row_token)
        source = torch.cat([source, source.new_zeros(1, source.shape[-1])])
        return source.index_select(0, self.row_token)

    def place(self, rows: torch.Tensor) -> torch.Tensor:
        """Sorted per-pair values `(S_valid, ...)` into buffer rows (zero padding)."""
        if self.position is None:
            return rows
        buffer = rows.new_zeros(self.num_rows, *rows.shape[1:])
        return buffer.index_copy_(0, self.position, rows)

    def take(self, buffer: torch.Tensor) -> torch.Tensor:
        """Buffer rows back to sorted per-pair values `(S_valid, ...)`."""
        return buffer if self.position is None else buffer.index_select(0, self.position)

    def scatter_sum(self, buffer: torch.Tensor) -> torch.Tensor:
        """Sum the per-pair buffer rows onto their tokens: `(num_tokens, d)`, accumulated in fp32 if low precision.

        A scatter to pair order then a sum over the k slots: deterministic (no atomic adds) and parallel.
        """
        acc_dtype = torch.float32 if buffer.dtype in (torch.float16, torch.bfloat16) else buffer.dtype
        if self.num_valid == self.num_pairs:
            full = buffer.index_select(0, self.pair_row)
        else:  # sentinel pairs contribute zero
            full = buffer.new_zeros(self.num_pairs, buffer.shape[-1])
            full.index_copy_(0, self.perm, self.take(buffer))
        return full.view(self.num_tokens, self.top_k, -1).sum(dim=1, dtype=acc_dtype)

    def _overflow_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The overflow experts' slice of `weight`, copied once per parameter and reused by its transposed view.

        The copies are keyed by `data_ptr()`, which identifies a weight only while the caller holds it: call
        `release_weight_copies` at the end of every forward and backward pass.
        """
        key = weight.data_ptr()
        if key in self._weight_copies:
            copy, stride = self._weight_copies[key]
            if stride == weight.stride():
                return copy
            if stride[:-2] == weight.stride()[:-2] and stride[-2:] == weight.stride()[::-1][:2]:
                return copy.transpose(1, 2)
        copy = weight.index_select(0, self.overflow)
        self._weight_copies[key] = (copy, weight.stride())
        return copy

    def release_weight_copies(self) -> None:
        """Drop the overflow weight copies (end of a forward or backward pass).

        A saved parameter can live in different storage in backward than in forward (FSDP2 frees the unsharded
        parameters after forward and gathers them again, into new memory, before backward), and another weight can
        then sit at an address a forward copy is keyed by: a copy kept across passes would be read for the wrong
        weight. Dropping them also keeps them out of the memory held between forward and backward.
        """
        self._weight_copies.clear()

    def _buckets(self, buffer: torch.Tensor, weight: torch.Tensor | None):
        """(rows of bucket as (experts, capacity, d), that bucket's experts' weights or None, expert ids or None)."""
        n, c0, c1 = self.num_experts, self.capacity0, self.capacity1
        d = buffer.shape[-1]
        yield 0, buffer[: n * c0].view(n, c0, d), weight, None
        if self.overflow.numel() > 0:
            m = self.overflow.numel()
            part = buffer[n * c0 :].view(m, c1, d)
            yield n * c0, part, (self._overflow_weight(weight) if weight is not None else None), self.overflow

    def mm(self, buffer: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each row `(K,)` of the buffer times its expert's `weight[e]` `(K, N)` -> `(num_rows, N)`."""
        if self.num_rows == 0:
            return buffer.new_zeros(0, weight.shape[-1])
        if self.grouped:
            return torch.nn.functional.grouped_mm(buffer, weight, offs=self.offsets)
        out = buffer.new_empty(self.num_rows, weight.shape[-1])
        for start, rows, w, _ in self._buckets(buffer, weight):
            experts, capacity = rows.shape[:2]
            if capacity > 0:
                torch.bmm(rows, w, out=out[start : start + experts * capacity].view(experts, capacity, w.shape[-1]))
        return out

    def mm_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-expert `a_e^T @ b_e` over the buffer rows `a` `(R, M)`, `b` `(R, N)` -> `(n, M, N)` (zero if empty)."""
        if self.num_rows == 0:
            return a.new_zeros(self.num_experts, a.shape[-1], b.shape[-1])
        if self.grouped:
            return torch.nn.functional.grouped_mm(a.t(), b, offs=self.offsets)
        (_, a0, _, _), *rest = self._buckets(a, None)
        (_, b0, _, _), *rest_b = self._buckets(b, None)
        grad = torch.bmm(a0.transpose(1, 2), b0)
        for (_, a1, _, experts), (_, b1, _, _) in zip(rest, rest_b, strict=True):
            grad.index_add_(0, experts, torch.bmm(a1.transpose(1, 2), b1))
        return grad


def _activation_kind(act_fn: nn.Module) -> str:
    if isinstance(act_fn, nn.ReLU):
        return "relu"
    if isinstance(act_fn, (nn.SiLU, SiLUActivation)):
        return "silu"
    return "generic"


def _hidden(pre: torch.Tensor, gated: bool, act_fn: nn.Module) -> torch.Tensor:
    """Expert hidden activation from the up projection `pre` (`[gate; up]` halves when gated)."""
    if gated:
        gate, up = pre.chunk(2, dim=-1)
        return act_fn(gate) * up
    return act_fn(pre)


def _hidden_backward(
    pre: torch.Tensor, grad_hidden: torch.Tensor, gated: bool, act_fn: nn.Module, kind: str
) -> torch.Tensor:
    """Gradient with respect to the up projection output, given the gradient of the hidden activation."""
    if kind == "relu" and not gated:
        return grad_hidden.mul_(pre > 0)
    if kind == "silu" and gated:
        gate, up = pre.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad_hidden * silu
        # d silu(g) / dg = s + g s (1 - s)
        grad_gate = grad_hidden.mul_(up).mul_(sig * (1 + gate * (1 - sig)))
        return torch.cat([grad_gate, grad_up], dim=-1)
    with torch.enable_grad():  # any other activation: differentiate it with autograd (elementwise, cheap)
        pre = pre.detach().requires_grad_(True)
        (grad_pre,) = torch.autograd.grad(_hidden(pre, gated, act_fn), pre, grad_hidden)
    return grad_pre


class _FusedExperts(torch.autograd.Function):
    """y_t = sum_{slots j} w_{t,j} * down[e_{t,j}] @ act(up[e_{t,j}] @ x_t), over the non-sentinel slots (SPEC §1)."""

    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        up_weight: torch.Tensor,
        down_weight: torch.Tensor,
        gated: bool,
        act_fn: nn.Module,
        recompute: bool,
    ) -> torch.Tensor:
        dispatch = _Dispatch(top_k_index, up_weight.shape[0], hidden_states, up_weight)
        x_rows = dispatch.gather(hidden_states)
        # Weights are stored (n, out, in) as in nn.Linear; the transposed views cost nothing.
        pre = dispatch.mm(x_rows, up_weight.transpose(1, 2))
        hidden = _hidden(pre, gated, act_fn)
        out = dispatch.mm(hidden, down_weight.transpose(1, 2))
        weights_rows = dispatch.place(top_k_weights.reshape(-1)[dispatch.perm])
        out.mul_(weights_rows.to(out.dtype).unsqueeze(-1))
        result = dispatch.scatter_sum(out).to(hidden_states.dtype)
        del out
        dispatch.release_weight_copies()

        kind = _activation_kind(act_fn)
        ctx.dispatch, ctx.gated, ctx.act_fn, ctx.kind, ctx.recompute = dispatch, gated, act_fn, kind, recompute
        ctx.weights_dtype = top_k_weights.dtype
        if recompute:  # keep nothing of size (rows, d): the backward gathers and recomputes them
            saved_pre = x_rows = None
        elif kind == "relu" and not gated:
            saved_pre = hidden  # relu'(pre) = (hidden > 0): the pre-activation need not be kept as well
        else:
            saved_pre = pre
        ctx.save_for_backward(hidden_states, weights_rows, up_weight, down_weight, saved_pre, x_rows)
        return result

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden_states, weights_rows, up_weight, down_weight, saved_pre, x_rows = ctx.saved_tensors
        dispatch: _Dispatch = ctx.dispatch
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        if x_rows is None:
            x_rows = dispatch.gather(hidden_states)
        if saved_pre is None:  # activation recomputation (SPEC §6)
            pre = dispatch.mm(x_rows, up_weight.transpose(1, 2))
            hidden = _hidden(pre, ctx.gated, ctx.act_fn)
        elif ctx.kind == "relu" and not ctx.gated:
            hidden = pre = saved_pre  # saved the ReLU output: (hidden > 0) == (pre > 0)
        else:
            pre = saved_pre
            hidden = _hidden(pre, ctx.gated, ctx.act_fn)

        grad_rows = dispatch.gather(grad_output)  # dL/dy of each pair's token (zero on padding rows)
        # d(down[e] h) / dh = down[e]^T g, before the routing weight: also gives dL/dw = <down[e]^T g, h>.
        grad_hidden = dispatch.mm(grad_rows, down_weight)
        grad_weights = None
        if need_w:
            grad_w_sorted = dispatch.take((grad_hidden.float() * hidden.float()).sum(-1))
            grad_weights = torch.zeros(dispatch.num_pairs, device=grad_w_sorted.device, dtype=ctx.weights_dtype)
            grad_weights.index_copy_(0, dispatch.perm, grad_w_sorted.to(ctx.weights_dtype))
            grad_weights = grad_weights.view(dispatch.num_tokens, dispatch.top_k)
        w = weights_rows.to(grad_rows.dtype).unsqueeze(-1)
        grad_down = dispatch.mm_weight(grad_rows.mul_(w), hidden) if need_down else None
        del hidden, grad_rows
        grad_pre = _hidden_backward(pre, grad_hidden.mul_(w), ctx.gated, ctx.act_fn, ctx.kind)
        del pre, grad_hidden
        grad_up = dispatch.mm_weight(grad_pre, x_rows) if need_up else None
        del x_rows
        grad_x = None
        if need_x:
            grad_x = dispatch.scatter_sum(dispatch.mm(grad_pre, up_weight)).to(hidden_states.dtype)
        dispatch.release_weight_copies()
        return grad_x, None, grad_weights, grad_up, grad_down, None, None, None


def fused_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward for classes decorated with `@use_experts_implementation` (fused `[gate; up]` or `up` weights).

    hidden_states `(num_tokens, hidden)`, top_k_index / top_k_weights `(num_tokens, k)` -> `(num_tokens, hidden)`.
    Recomputes the expert activations in backward when `self.config.expert_recompute_activations` is true.
    """
    if getattr(self, "has_bias", False) or getattr(self, "has_post_expert_norm", False):
        raise NotImplementedError(
            f"experts_implementation={FAST_EXPERTS_IMPLEMENTATION!r} supports experts without biases or post-expert "
            f"norm; {type(self).__name__} has has_bias={self.has_bias}, has_post_expert_norm={self.has_post_expert_norm}."
        )
    gated = getattr(self, "has_gate", True)
    if gated and not getattr(self, "is_concatenated", True):
        raise NotImplementedError(
            f"experts_implementation={FAST_EXPERTS_IMPLEMENTATION!r} needs the concatenated [gate; up] layout; "
            f"{type(self).__name__} has is_concatenated=False."
        )
    up_weight = self.gate_up_proj if gated else self.up_proj
    down_weight = self.down_proj
    if getattr(self, "is_transposed", False):  # stored (n, in, out): view as (n, out, in)
        up_weight, down_weight = up_weight.transpose(1, 2), down_weight.transpose(1, 2)
    if top_k_index.shape != top_k_weights.shape or top_k_index.dim() != 2:
        raise ValueError(
            f"`top_k_index` and `top_k_weights` must both have shape (num_tokens, k), got "
            f"{tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}."
        )
    if top_k_index.numel() > 0 and int(top_k_index.min()) < 0:
        raise ValueError(f"`top_k_index` contains a negative expert id {int(top_k_index.min())}.")
    recompute = bool(getattr(getattr(self, "config", None), "expert_recompute_activations", False))
    return _FusedExperts.apply(
        hidden_states, top_k_index, top_k_weights, up_weight, down_weight, gated, self.act_fn, recompute
    )


ALL_EXPERTS_FUNCTIONS.register(FAST_EXPERTS_IMPLEMENTATION, fused_experts_forward)

__all__ = ["FAST_EXPERTS_IMPLEMENTATION", "fused_experts_forward"]
