"""A fast experts implementation: pairs sorted by expert, processed in cache-sized blocks, with a hand-written backward.

SPEC §6 ("shrinking batch"): an expert sees about `k * tokens / n` rows. On the CPU this project is developed on
(README, "Performance"), one (256 x 512) @ (512 x 1024) expert matmul already runs at about the speed of the dense one;
what makes a MoE layer slow there is the element-wise work around the matmuls. A fresh tensor of tens of MiB comes from
`mmap` and page-faults on first touch: a ReLU over a (16384, 1024) fp32 tensor takes ~22 ms into fresh memory and
~4.5 ms into reused memory, and a layer makes several such tensors (gathered inputs, pre-activations, expert outputs and
their gradients). So here the token-expert pairs are sorted by expert and cut into blocks of whole experts of a few MiB;
per block, the gather, one `mm` per expert on its exact rows (no padding), the activation, the routing weight and the
scatter-add onto the tokens all work on small temporaries that stay in cache and are reused by the allocator. The
blocks are shared out, in runs of whole experts, to worker threads (up to `max(k, 2)`) that split the intra-op
threads between them: a matmul with a few hundred rows or fewer does not keep several cores busy on its own.

Backward needs only the expert hidden activations, kept per block, or nothing with
`MoEConfig(expert_recompute_activations=True)` (SPEC §6 "activation recomputation": recomputed per block). Each
weight gradient is written once per expert straight into the gradient tensor (no full-size zero gradient per expert),
and the routing-weight gradient `d w_{t,e} = <W_down[e]^T g_t, h_{t,e}>` needs no copy of the expert outputs.

On CUDA in bf16 where `torch.nn.functional.grouped_mm` is one grouped kernel (compute capability 9.x / 10.x, fewer than
1024 experts, aligned strides: see `_grouped_mm_ok`), all rows form a single block and each product is one
`grouped_mm` call, whose output is used as it is (the weight gradients included).

It is registered in transformers' experts interface under `"moe_fused"`, so any class decorated with
`@use_experts_implementation` (ours, or e.g. OLMoE's) can select it with
`from_pretrained(..., experts_implementation="moe_fused")` or `model.set_experts_implementation("moe_fused")`.
Expert-parallel sentinels (expert ids `>= num_experts`: "expert on another rank") contribute zero, as in
`transformers.integrations.moe`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

FAST_EXPERTS_IMPLEMENTATION = "moe_fused"

# Bytes of a block's widest temporary (rows x widest projection): a few MiB stay in L2/L3 and are reused from the
# allocator's free lists (glibc maps anything above 32 MiB afresh), yet leave the per-block Python work negligible.
BLOCK_BYTES = 4 * 2**20
# Below this mean number of rows per expert the weight gradients are zero-filled up front (see `new_grad`).
_ZERO_FILL_BELOW_ROWS_PER_EXPERT = 64


# torch's CUDA `_grouped_mm` (aten/src/ATen/native/cuda/GroupedBlas.cpp, GroupMM.cu) runs one CUTLASS grouped kernel
# only for bf16 on compute capability 9.x and 10.x (`_scaled_mm_allowed_device(sm90_only, sm100_only)`), and that
# kernel refuses 1024 groups or more ("Can't process more than 1024 groups": its set-up kernel has one thread per
# group). Elsewhere (SM80/SM89/SM12x, other dtypes) `grouped_mm` is `_grouped_mm_fallback`: it copies `offs` to the
# host and loops over the groups with `mm`, as `_SortedRouting.mm` does without the copy.
_GROUPED_MM_CAPABILITY_MAJORS = (9, 10)
GROUPED_MM_MAX_GROUPS = 1023


def torch_runs_grouped_kernel(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's `grouped_mm` on this device and dtype is its grouped kernel (CUDA, bf16, compute capability
    9.x / 10.x), which takes at most `GROUPED_MM_MAX_GROUPS` groups, rather than its fallback loop over `mm`."""
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device)[0] in _GROUPED_MM_CAPABILITY_MAJORS
    )


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `grouped_mm(a, b)` (`b`: the `(groups, K, N)` weights) is one fast grouped kernel: CUDA, bf16, compute
    capability 9.x / 10.x, at most `GROUPED_MM_MAX_GROUPS` groups, 16-byte aligned strides and pointers."""
    if (
        not hasattr(torch.nn.functional, "grouped_mm")
        or b.dtype != torch.bfloat16
        or b.shape[0] > GROUPED_MM_MAX_GROUPS
    ):
        return False
    if not torch_runs_grouped_kernel(a.device, a.dtype):
        return False
    align = 16 // a.element_size()
    if any(size % align != 0 for size in b.shape[1:]):  # the widths of the rows made for it (and their transposes)
        return False
    for t in (a, b):
        if t.data_ptr() % 16 != 0 or any(
            s % align != 0 for s, n in zip(t.stride(), t.shape, strict=True) if s != 1 and n > 1
        ):
            return False
    return True


class _Segment(NamedTuple):
    """Rows `[start, end)` of a block (relative to the block) that go to `expert`; `first` / `last`: the expert's
    first / last rows (both for an expert within one block)."""

    expert: int
    start: int
    end: int
    first: bool
    last: bool


class _Block(NamedTuple):
    """Sorted rows `[start, end)`, made of whole experts (or part of one expert holding more than a block's rows)."""

    start: int
    end: int
    segments: list[_Segment]


class _SortedRouting:
    """The token-expert pairs sorted by expert and cut into blocks, and the per-expert matmuls over a block's rows.

    Sorted row `r` is pair `pair[r]` (= token * k + slot) of token `token[r]`; pairs routed to a sentinel id
    (`>= num_experts`) are dropped. With `block_rows=None` all rows form one block. The matmuls are one `grouped_mm`
    call over all rows when `grouped` (CUDA bf16), else one `mm` per expert segment into the caller's output rows.
    """

    def __init__(self, top_k_index: torch.Tensor, num_experts: int, block_rows: int | None, grouped: bool) -> None:
        self.num_tokens, self.top_k = top_k_index.shape
        self.num_pairs = top_k_index.numel()
        self.num_experts = num_experts
        sorted_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
        # Sentinels all land in the extra bin `num_experts`, which is dropped.
        counts = torch.bincount(sorted_ids.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
        self.offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # end row of each expert (grouped_mm's offs)
        counts_list = counts.tolist()
        self.num_rows = sum(counts_list)
        self.pair = order[: self.num_rows]
        self.token = self.pair // self.top_k
        self.empty_experts = [e for e, c in enumerate(counts_list) if c == 0]
        # The same on the device, made here, where `tolist` has just waited for the device: zeroing those experts'
        # weight gradients in backward then copies nothing from the host (a copy that would wait for the device).
        self.empty_index = (
            torch.tensor(self.empty_experts, dtype=torch.long, device=counts.device) if self.empty_experts else None
        )
        self.grouped = grouped
        # Low-precision weight gradients of experts larger than a block, summed in fp32 until their last block.
        self.partial_grads: dict[tuple[int, int], torch.Tensor] = {}
        if grouped:
            self.blocks = [_Block(0, self.num_rows, [])]
        else:
            self.blocks = self._cut(counts_list, self.num_rows if block_rows is None else block_rows)

    @staticmethod
    def _cut(counts: list[int], block_rows: int) -> list[_Block]:
        """Greedy blocks of whole experts up to `block_rows` rows; an expert above that gets blocks of its own."""
        blocks: list[_Block] = []
        segments: list[_Segment] = []
        start = fill = 0

        def close() -> None:
            nonlocal segments, start, fill
            if segments:
                blocks.append(_Block(start, start + fill, segments))
            segments, start, fill = [], start + fill, 0

        for expert, count in enumerate(counts):
            if count == 0:
                continue
            if fill + count > block_rows:
                close()
            for part in range(0, count, block_rows):
                rows = min(block_rows, count - part)
                if fill + rows > block_rows:
                    close()
                segments.append(_Segment(expert, fill, fill + rows, part == 0, part + rows == count))
                fill += rows
        close()
        return blocks

    def block_groups(self, parts: int) -> list[list[_Block]]:
        """The blocks in at most `parts` runs of about equal rows, cut only where an expert starts (at the block of
        those nearest to each `num_rows * j / parts`), so that each expert's weight gradient is written by one group."""
        starts = [(block.start, i) for i, block in enumerate(self.blocks) if i > 0 and block.segments[0].first]
        cuts = [0]
        for j in range(1, parts):
            nearest = min(starts, key=lambda start: abs(start[0] - self.num_rows * j / parts), default=None)
            if nearest is not None and nearest[1] > cuts[-1]:
                cuts.append(nearest[1])
        return [self.blocks[a:b] for a, b in zip(cuts, [*cuts[1:], len(self.blocks)], strict=True)]

    def mm(
        self, rows: torch.Tensor, weight: torch.Tensor, block: _Block, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each row `(K,)` of the block times its expert's `weight[e]` `(K, N)`: `(block rows, N)`, written into `out`
        when given, else into a new tensor. Grouped, it is `grouped_mm`'s own output (`out` is not used): copying it
        into `out` would add a pass over memory as long as a bandwidth-bound product's own."""
        if self.grouped:
            return torch.nn.functional.grouped_mm(rows, weight, offs=self.offsets)
        if out is None:
            out = rows.new_empty(rows.shape[0], weight.shape[-1])
        for segment in block.segments:
            torch.mm(rows[segment.start : segment.end], weight[segment.expert], out=out[segment.start : segment.end])
        return out

    def weight_grad(self, a: torch.Tensor, b: torch.Tensor, block: _Block, grad: torch.Tensor | None) -> torch.Tensor:
        """`grad[e] (+)= a_e^T @ b_e` over the block's rows `a` `(rows, M)`, `b` `(rows, N)`; `grad` `(n, M, N)` from
        `new_grad`. Returns the gradient: `grad`, or grouped (where `new_grad` gives None) `grouped_mm`'s own output."""
        if self.grouped:
            grad = torch.nn.functional.grouped_mm(a.t(), b, offs=self.offsets)
            if self.empty_experts:  # not every grouped kernel writes the groups without rows
                grad.index_fill_(0, self.empty_index, 0)
            return grad
        for s in block.segments:
            a_e, b_e = a[s.start : s.end].t(), b[s.start : s.end]
            # One matmul for an expert within one block; in fp32/fp64 an expert's later parts are added in place.
            if (s.first and s.last) or grad.element_size() >= 4:
                if s.first:
                    torch.mm(a_e, b_e, out=grad[s.expert])
                else:
                    grad[s.expert].addmm_(a_e, b_e)
            else:
                # bf16/fp16: the parts are added in fp32 and rounded once, as one matmul over all the rows would be.
                # An expert's blocks run in order on one worker (runs are cut where an expert starts).
                key = (grad.data_ptr(), s.expert)
                part = torch.mm(a_e.float(), b_e.float())
                if not s.first:
                    part += self.partial_grads.pop(key)
                if s.last:
                    grad[s.expert].copy_(part)
                else:
                    self.partial_grads[key] = part
        return grad

    def new_grad(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A gradient for `weight` `(n, M, N)`, to be written per expert; experts without rows get zero. None when
        grouped: `weight_grad` returns `grouped_mm`'s output, which is the whole gradient.

        With few rows per expert the weight-gradient matmuls are bound by writing the gradient's fresh pages, whose
        faults cost far less in one parallel zero-fill up front (1024 experts at 16 rows each: ~3.7x instead of ~4.3x
        the dense layer's time); with more rows that fill is an extra pass (64 experts at 256 rows: ~1.3x instead of
        ~1.16x; both measured single-threaded), so the matmuls write uninitialised memory. README, "Performance".
        """
        if self.grouped:
            return None
        if self.num_rows < _ZERO_FILL_BELOW_ROWS_PER_EXPERT * self.num_experts:
            return torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        if self.empty_experts:
            grad.index_fill_(0, self.empty_index, 0)
        return grad


def _sums_pairwise(device: torch.device) -> bool:
    """Whether per-token sums place the rows in pair order and sum over the k slots (CUDA, where `index_add_` uses
    atomics, so its result would depend on timing) rather than `index_add_` them per block (deterministic on CPU)."""
    return device.type == "cuda"


class _TokenSum:
    """Per-token sums of per-row values `(rows, d)` -> `(num_tokens, d)`, accumulated in fp32 for low precision,
    pairwise or by `index_add_` (see `_sums_pairwise`)."""

    def __init__(self, routing: _SortedRouting, like: torch.Tensor) -> None:
        self.routing = routing
        self.dtype = like.dtype
        self.acc_dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        self.pairwise = _sums_pairwise(like.device)
        rows = routing.num_pairs if self.pairwise else routing.num_tokens
        self.total = torch.zeros(
            rows, like.shape[-1], dtype=self.acc_dtype if not self.pairwise else like.dtype, device=like.device
        )

    def add(self, block: _Block, values: torch.Tensor) -> None:
        if self.pairwise:
            self.total.index_copy_(0, self.routing.pair[block.start : block.end], values)
        else:
            self.total.index_add_(0, self.routing.token[block.start : block.end], values.to(self.acc_dtype))

    @staticmethod
    def merged(parts: list[_TokenSum]) -> torch.Tensor:
        """The result of the sums of `parts` (one per group of blocks, in block order) added together."""
        first = parts[0]
        for part in parts[1:]:
            first.total += part.total
        return first.result()

    def result(self) -> torch.Tensor:
        if self.pairwise:
            routing = self.routing
            summed = self.total.view(routing.num_tokens, routing.top_k, -1).sum(dim=1, dtype=self.acc_dtype)
            return summed.to(self.dtype)
        return self.total.to(self.dtype)


_Item = TypeVar("_Item")
_GroupResult = TypeVar("_GroupResult")


def worker_thread_count(top_k: int) -> int:
    """How many worker threads `moe_fused` shares its blocks out to on a CPU: at most `max(k, 2)` (see
    `_run_block_groups`), and no more than the caller's intra-op threads."""
    return min(torch.get_num_threads(), max(top_k, 2))


def map_in_worker_threads(work: Callable[[_Item], _GroupResult], items: list[_Item]) -> list[_GroupResult]:
    """`work(item)` for each item, in order, each in its own worker thread with an even share of the caller's
    `torch.get_num_threads()` intra-op threads."""
    caller_threads = torch.get_num_threads()

    def task(item: _Item) -> _GroupResult:
        torch.set_num_threads(caller_threads // len(items))
        return work(item)

    try:
        with ThreadPoolExecutor(len(items), thread_name_prefix="moe_fused") as pool:
            return list(pool.map(task, items))
    finally:
        # `set_num_threads` also sets the count that threads started later begin with: give the caller's back.
        torch.set_num_threads(caller_threads)


def _run_block_groups(routing: _SortedRouting, work: Callable[[list[_Block]], _GroupResult]) -> list[_GroupResult]:
    """`work(blocks)` for each group of blocks, in order. Blocks are cut on the CPU only; with several, the groups run
    in worker threads that share the caller's `torch.get_num_threads()` intra-op threads out evenly.

    With fewer than a few hundred rows per expert a matmul does not keep two cores busy (1024 experts with 16 rows each:
    ~40 GFLOP/s on one core, ~60 on two, ~75-80 with the experts shared out to two single-threaded workers; see
    `moe-bench --mode gemm`), and the element-wise work between the matmuls is serial per block anyway. Each group has
    its own `(num_tokens, hidden)` sums (fp32 for half-precision inputs), added in order afterwards, so the result
    depends on the number of groups only, not on the threads' timing; there are at most `max(k, 2)` groups, which
    bounds the memory of those sums by about that of the `(num_tokens * k, hidden)` expert outputs transformers' own
    experts paths hold, whatever the number of cores. The workers run without autograd, as the caller does (an autograd
    function's forward and backward, or inference), in inference mode if the caller is. Under a dispatch mode (e.g.
    torch's `FlopCounterMode`), which sees only the thread it was entered in, the same groups run here in turn.
    """
    groups = routing.block_groups(worker_thread_count(routing.top_k))
    if len(groups) == 1 or _get_current_dispatch_mode() is not None:
        return [work(group) for group in groups]
    inference = torch.is_inference_mode_enabled()

    def autograd_off(group: list[_Block]) -> _GroupResult:
        with torch.inference_mode(inference), torch.no_grad():
            return work(group)

    return map_in_worker_threads(autograd_off, groups)


def _activation_kind(act_fn: nn.Module) -> str:
    if isinstance(act_fn, nn.ReLU):
        return "relu"
    if isinstance(act_fn, (nn.SiLU, SiLUActivation)):
        return "silu"
    return "generic"


def _stores_hidden(act_fn: nn.Module, gated: bool) -> bool:
    """Whether backward keeps the hidden activation rather than the pre-activation: a plain ReLU, whose derivative
    `(hidden > 0)` the hidden activation gives."""
    return _activation_kind(act_fn) == "relu" and not gated


def _hidden(pre: torch.Tensor, gated: bool, act_fn: nn.Module) -> torch.Tensor:
    """Expert hidden activation from the up projection `pre` (`[gate; up]` halves when gated)."""
    if gated:
        gate, up = pre.chunk(2, dim=-1)
        return act_fn(gate) * up
    return act_fn(pre)


def _hidden_backward(
    pre: torch.Tensor, grad_hidden: torch.Tensor, gated: bool, act_fn: nn.Module, kind: str
) -> torch.Tensor:
    """Gradient with respect to the up projection output, given the gradient of the hidden activation (overwritten).

    `pre` is the up projection output, or for a plain ReLU the hidden activation (positive exactly where that was).
    """
    # ATen's own activation backward kernels: one pass each, where composing them from element-wise ops takes 3-10.
    if kind == "relu" and not gated:
        return torch.ops.aten.threshold_backward(grad_hidden, pre, 0.0)
    if kind == "silu" and gated:  # h = silu(gate) * up
        gate, up = pre.chunk(2, dim=-1)
        grad_pre = torch.empty_like(pre)
        grad_gate, grad_up = grad_pre.chunk(2, dim=-1)
        torch.mul(grad_hidden, nn.functional.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_hidden.mul_(up), gate, grad_input=grad_gate)
        return grad_pre
    with torch.enable_grad():  # any other activation: differentiate it with autograd (elementwise, cheap)
        pre = pre.detach().requires_grad_(True)
        (grad_pre,) = torch.autograd.grad(_hidden(pre, gated, act_fn), pre, grad_hidden)
    return grad_pre


def _up_and_hidden(
    routing: _SortedRouting,
    block: _Block,
    x_rows: torch.Tensor,
    up_t: torch.Tensor,
    gated: bool,
    act_fn: nn.Module,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(what backward keeps, hidden activation) of a block's rows: for a plain ReLU the hidden activation twice (its
    derivative is `hidden > 0`), else the pre-activation `(rows, up width)` and the hidden activation."""
    pre = routing.mm(x_rows, up_t, block)
    if relu:
        hidden = pre.relu_()  # relu'(pre) = (hidden > 0): the pre-activation is not needed
        return hidden, hidden
    return pre, _hidden(pre, gated, act_fn)


def _experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    gated: bool,
    act_fn: nn.Module,
    store: bool,
) -> tuple[torch.Tensor, _SortedRouting, torch.Tensor, list[torch.Tensor] | None]:
    """(output `(num_tokens, hidden)`, routing, per-row routing weights, stored activations per block or None).

    Stored (when `store`), one tensor per block: the hidden activations `(block rows, expert hidden)` for a plain ReLU,
    whose derivative they give, else the pre-activations `(block rows, up width)`. Per block, not one buffer: each is
    below glibc's 32 MiB `mmap` threshold, so it comes from the heap, whose freed memory is reused, not from a fresh
    `mmap` whose pages fault in (measured: ~2% of the 64-expert layer's step).
    """
    # Weights are stored (n, out, in) as in nn.Linear; the transposed (n, in, out) views cost nothing.
    up_t, down_t = up_weight.transpose(1, 2), down_weight.transpose(1, 2)
    grouped = _grouped_mm_ok(hidden_states, up_t) and _grouped_mm_ok(hidden_states, down_t)
    block_rows = None
    if not grouped and hidden_states.device.type == "cpu":  # cache-sized blocks; one block on accelerators
        block_rows = max(1, BLOCK_BYTES // (max(up_weight.shape[1:]) * hidden_states.element_size()))
    routing = _SortedRouting(top_k_index, up_weight.shape[0], block_rows, grouped)
    relu = _stores_hidden(act_fn, gated)
    weights_rows = top_k_weights.reshape(-1)[routing.pair].to(hidden_states.dtype)

    def forward_blocks(blocks: list[_Block]) -> tuple[_TokenSum, list[torch.Tensor]]:
        output, stored = _TokenSum(routing, hidden_states), []
        for block in blocks:
            x_rows = hidden_states.index_select(0, routing.token[block.start : block.end])
            pre, hidden = _up_and_hidden(routing, block, x_rows, up_t, gated, act_fn, relu)
            if store:
                stored.append(pre)
            out = routing.mm(hidden, down_t, block)
            output.add(block, out.mul_(weights_rows[block.start : block.end, None]))
        return output, stored

    groups = _run_block_groups(routing, forward_blocks)
    stored = [pre for _, group_stored in groups for pre in group_stored] if store else None
    return _TokenSum.merged([output for output, _ in groups]), routing, weights_rows, stored


class _FusedExperts(torch.autograd.Function):
    """y_t = sum_{slots j} w_{t,j} * down[e_{t,j}] @ act(up[e_{t,j}] @ x_t), over the non-sentinel slots (SPEC §1)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        up_weight: torch.Tensor,
        down_weight: torch.Tensor,
        gated: bool,
        act_fn: nn.Module,
        recompute: bool,
    ) -> torch.Tensor:
        output, routing, weights_rows, stored = _experts_forward(
            hidden_states, top_k_index, top_k_weights, up_weight, down_weight, gated, act_fn, store=not recompute
        )
        ctx.routing, ctx.gated, ctx.act_fn = routing, gated, act_fn
        ctx.kind, ctx.relu = _activation_kind(act_fn), _stores_hidden(act_fn, gated)
        ctx.weights_dtype = top_k_weights.dtype
        ctx.save_for_backward(hidden_states, weights_rows, up_weight, down_weight, *(stored or ()))
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_states, weights_rows, up_weight, down_weight, *stored = ctx.saved_tensors
        routing: _SortedRouting = ctx.routing
        need_x, _, need_w, need_up, need_down = ctx.needs_input_grad[:5]
        up_t = up_weight.transpose(1, 2)
        grad_output = grad_output.to(hidden_states.dtype)
        grad_up = routing.new_grad(up_weight) if need_up else None
        grad_down = routing.new_grad(down_weight) if need_down else None
        grad_w_rows = torch.empty(routing.num_rows, device=weights_rows.device, dtype=torch.float32) if need_w else None
        block_index = {block.start: index for index, block in enumerate(routing.blocks)}

        def backward_blocks(blocks: list[_Block]) -> _TokenSum | None:
            # Groups write disjoint rows of grad_w_rows and disjoint experts of grad_up / grad_down. `weight_grad`
            # returns the tensor it was given, except grouped (one block, one group), where it makes the gradient.
            nonlocal grad_up, grad_down
            grad_x = _TokenSum(routing, hidden_states) if need_x else None
            for block in blocks:
                tokens = routing.token[block.start : block.end]
                w = weights_rows[block.start : block.end, None]
                x_rows = hidden_states.index_select(0, tokens)
                if not stored:  # activation recomputation (SPEC §6)
                    pre, hidden = _up_and_hidden(routing, block, x_rows, up_t, ctx.gated, ctx.act_fn, ctx.relu)
                elif ctx.relu:
                    pre = hidden = stored[block_index[block.start]]
                else:
                    pre = stored[block_index[block.start]]
                    hidden = _hidden(pre, ctx.gated, ctx.act_fn)
                grad_rows = grad_output.index_select(0, tokens)  # dL/dy of each row's token
                # d(down[e] h) / dh = down[e]^T g, before the routing weight: also gives dL/dw = <down[e]^T g, h>.
                grad_hidden = routing.mm(grad_rows, down_weight, block)
                if need_w:
                    grad_w_rows[block.start : block.end] = torch.linalg.vecdot(grad_hidden.float(), hidden.float())
                if need_down:
                    grad_down = routing.weight_grad(grad_rows.mul_(w), hidden, block, grad_down)
                grad_pre = _hidden_backward(pre, grad_hidden.mul_(w), ctx.gated, ctx.act_fn, ctx.kind)
                if need_up:
                    grad_up = routing.weight_grad(grad_pre, x_rows, block, grad_up)
                if need_x:
                    grad_x.add(block, routing.mm(grad_pre, up_weight, block, x_rows))  # x_rows is free: reuse it
            return grad_x

        grad_x_parts = _run_block_groups(routing, backward_blocks)
        grad_weights = None
        if need_w:
            grad_weights = torch.zeros(routing.num_pairs, device=grad_w_rows.device, dtype=ctx.weights_dtype)
            grad_weights.index_copy_(0, routing.pair, grad_w_rows.to(ctx.weights_dtype))
            grad_weights = grad_weights.view(routing.num_tokens, routing.top_k)
        grad_x = _TokenSum.merged(grad_x_parts) if need_x else None
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
    device_type = hidden_states.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast and hidden_states.dtype != torch.float64:  # autocast leaves float64 alone
        # Under `torch.autocast` (`Trainer(bf16=True)`: float32 weights) the products run in its dtype, as the eager
        # experts' `F.linear` do there: `torch.mm(..., out=...)` and `grouped_mm` are no autocast ops, so they would
        # run in float32, never reaching the grouped kernel. The casts pass float32 gradients to the weights.
        dtype = torch.get_autocast_dtype(device_type)
        hidden_states, up_weight, down_weight = (t.to(dtype) for t in (hidden_states, up_weight, down_weight))
    recompute = bool(getattr(getattr(self, "config", None), "expert_recompute_activations", False))
    if not torch.is_grad_enabled() or not any(
        t.requires_grad for t in (hidden_states, top_k_weights, up_weight, down_weight)
    ):  # inference: nothing to store for a backward
        return _experts_forward(
            hidden_states, top_k_index, top_k_weights, up_weight, down_weight, gated, self.act_fn, store=False
        )[0]
    return _FusedExperts.apply(
        hidden_states, top_k_index, top_k_weights, up_weight, down_weight, gated, self.act_fn, recompute
    )


ALL_EXPERTS_FUNCTIONS.register(FAST_EXPERTS_IMPLEMENTATION, fused_experts_forward)

__all__ = ["FAST_EXPERTS_IMPLEMENTATION", "fused_experts_forward"]
