"""The fused experts path (modeling_moe/fast_experts.py) against the eager reference, its selection by name, the
activation-recomputation option (SPEC §6) and a smoke run of the benchmark script."""

import importlib.util
import re
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modeling_moe import MoEConfig, MoEForCausalLM, fast_experts
from modeling_moe.cli.benchmark import BMM_IN_WORKERS, MM_IN_WORKERS, parse_args
from modeling_moe.cli.cpu_malloc import allocator_name, can_measure_resident_growth
from modeling_moe.fast_experts import FAST_EXPERTS_IMPLEMENTATION, fused_experts_forward
from modeling_moe.modeling_moe import MoEExperts, MoEGatedExperts, _experts_eager_forward

from .conftest import tiny_olmoe

ROOT = Path(__file__).resolve().parents[1]


def _experts(activation: str, num_experts: int = 6, hidden: int = 16, intermediate: int = 24, **kwargs):
    config = MoEConfig(
        hidden_size=hidden,
        num_attention_heads=1,
        head_dim=2,  # only the experts are built: any hidden size, the attention geometry is unused
        num_experts=num_experts,
        num_experts_per_tok=min(2, num_experts),
        expert_intermediate_size=intermediate,
        expert_activation=activation,
        **kwargs,
    )
    experts = (MoEGatedExperts if activation == "swiglu" else MoEExperts)(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in experts.parameters():
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return experts


def _run(fn, experts, x, index, weights, dtype=torch.float32):
    """Output and gradients (input, routing weights, expert weights) under a fixed random output gradient."""
    x = x.detach().to(dtype).requires_grad_(True)
    weights = weights.detach().to(dtype).requires_grad_(True)
    for p in experts.parameters():
        p.grad = None
    out = fn(experts, x, index, weights)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, dtype)
    (out * grad_out).sum().backward()
    return [out.detach(), x.grad, weights.grad] + [p.grad for p in experts.parameters()]


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int = 0, experts_used: int | None = None):
    generator = torch.Generator().manual_seed(seed)
    pool = experts_used or num_experts
    index = torch.stack([torch.randperm(pool, generator=generator)[:top_k] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, top_k, generator=generator)
    return index, weights


def _assert_matches_eager(experts, x, index, weights, atol=1e-5):
    reference = _run(_experts_eager_forward, experts, x, index, weights)
    fused = _run(fused_experts_forward, experts, x, index, weights)
    names = ["output", "grad input", "grad routing weights"] + [n for n, _ in experts.named_parameters()]
    for name, a, b in zip(names, reference, fused, strict=True):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=atol, rtol=1e-5), (name, (a - b).abs().max())


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize(
    "case",
    ["random", "empty_experts", "many_rows", "k_equals_n", "single_token", "sentinel", "unaligned_sizes", "skewed"],
)
def test_fused_matches_eager_forward_and_backward(activation, case):
    torch.manual_seed(0)
    num_experts, num_tokens, top_k, used = 6, 21, 2, None
    hidden, intermediate = 16, 24
    if case == "empty_experts":
        used = 3  # experts 3..5 receive no token
    elif case == "many_rows":  # >= 64 rows per expert: uninitialised weight gradients, the empty experts zeroed
        num_tokens, used = 400, 4
    elif case == "k_equals_n":
        num_experts, top_k = 3, 3
    elif case == "single_token":
        num_tokens = 1
    elif case == "unaligned_sizes":
        hidden, intermediate = 15, 13  # strides no multiple of 16 bytes (no grouped_mm even on CUDA)
    experts = _experts(activation, num_experts, hidden, intermediate)
    x = torch.randn(num_tokens, hidden)
    index, weights = _routing(num_tokens, num_experts, top_k, experts_used=used)
    if case == "skewed":  # one expert takes most pairs: exercises the overflow bucket
        index[: num_tokens - 3, 0] = 1
        index[: num_tokens - 3, 1] = torch.where(index[: num_tokens - 3, 1] == 1, 2, index[: num_tokens - 3, 1])
    if case == "sentinel":
        index[0, 1] = num_experts  # expert-parallel sentinel: "on another rank", contributes zero
        index[5, 0] = num_experts
        index[5, 1] = num_experts  # a token with no local expert at all
    _assert_matches_eager(experts, x, index, weights)
    if case == "sentinel":
        fused = _run(fused_experts_forward, experts, x, index, weights)
        assert fused[2][0, 1] == 0 and (fused[2][5] == 0).all()  # no routing gradient through sentinels
        assert (fused[0][5] == 0).all()


def _busy_routing(num_tokens: int = 200):
    """8 experts over 200 tokens, expert 5 taking far more rows than the others and expert 2 none."""
    index, weights = _routing(num_tokens, 8, 2, seed=3)
    index[:120, 0] = 5
    index[:120, 1] = torch.where(index[:120, 1] == 5, 6, index[:120, 1])
    index[index == 2] = 3
    return index, weights


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_blocks_split_busy_experts_and_stay_exact(monkeypatch, activation):
    """Blocks of a few rows: several experts share a block, and an expert holding more rows than a block is cut
    over several blocks (its weight gradient accumulated across them); the result is still eager's."""
    experts = _experts(activation, num_experts=8, hidden=16, intermediate=8)
    num_tokens = 200
    index, weights = _busy_routing(num_tokens)
    up_width = experts.gate_up_proj.shape[1] if activation == "swiglu" else 8
    rows_per_block = 40
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", rows_per_block * max(up_width, 16) * 4)
    routing = fast_experts._SortedRouting(index, 8, rows_per_block, grouped=False)
    counts = torch.bincount(index.reshape(-1), minlength=8).tolist()
    assert all(block.end - block.start <= rows_per_block for block in routing.blocks)
    assert [b.start for b in routing.blocks[1:]] == [b.end for b in routing.blocks[:-1]]
    assert routing.blocks[-1].end == 2 * num_tokens and routing.empty_experts == [2]
    for expert, count in enumerate(counts):
        segments = [s for b in routing.blocks for s in b.segments if s.expert == expert]
        assert sum(s.end - s.start for s in segments) == count
        assert [s.first for s in segments] == [True] + [False] * (len(segments) - 1) if count else segments == []
        if 0 < count <= rows_per_block:
            assert len(segments) == 1  # a small expert is never cut
    assert sum(s.expert == 5 for b in routing.blocks for s in b.segments) >= 3
    _assert_matches_eager(experts, torch.randn(num_tokens, 16), index, weights)


def test_block_groups_are_balanced_runs_cut_where_an_expert_starts():
    index, _ = _busy_routing()
    routing = fast_experts._SortedRouting(index, 8, 40, grouped=False)
    for parts in (1, 2, 3, 64):
        groups = routing.block_groups(parts)
        assert [block for group in groups for block in group] == routing.blocks  # all blocks, in order
        assert 1 <= len(groups) <= parts and all(groups)
        assert all(group[0].segments[0].first for group in groups)  # no expert split over two groups
    assert len(routing.block_groups(2)) == 2
    rows = [sum(block.end - block.start for block in group) for group in routing.block_groups(2)]
    assert max(rows) <= 0.75 * sum(rows)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_groups_in_threads_match_eager_and_restore_the_thread_count(monkeypatch, activation, recompute):
    """With several blocks and two intra-op threads, forward and backward run as two groups of blocks in two worker
    threads; the result is eager's, and the caller's thread count (also the one later threads start with) is kept."""
    experts = _experts(activation, num_experts=8, hidden=16, intermediate=8, expert_recompute_activations=recompute)
    index, weights = _busy_routing()
    up_width = experts.gate_up_proj.shape[1] if activation == "swiglu" else 8
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 40 * max(up_width, 16) * 4)
    workers: list[int] = []

    class CountingPool(fast_experts.ThreadPoolExecutor):
        def __init__(self, max_workers, **kwargs):
            workers.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(fast_experts, "ThreadPoolExecutor", CountingPool)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _assert_matches_eager(experts, torch.randn(200, 16), index, weights)
        assert workers == [2, 2]  # forward and backward, each in two groups
        assert torch.get_num_threads() == 2
        started_later = []
        thread = threading.Thread(target=lambda: started_later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert started_later == [2]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_give_the_same_bits_whichever_worker_finishes_first(monkeypatch, dtype):
    """The worker threads' results are summed in group order, not in the order they finish: the groups run one after
    the other, last group first, give the output and gradients of the threaded run bit for bit (README: the result
    depends on the thread count only, not on timing). k = 4: a token's slots fall into both groups; in bf16 the weight
    gradients of experts over several blocks are also summed across blocks."""
    experts = _experts("relu", num_experts=8, hidden=16, intermediate=8).to(dtype)
    index, weights = _routing(200, 8, 4, seed=5)
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 10 * 16 * 4)  # 10-row blocks: 80 of them
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(6))

    def last_group_first(work, items):
        threads, results = torch.get_num_threads(), {}
        try:
            for position in reversed(range(len(items))):
                torch.set_num_threads(threads // len(items))  # each group's share of the threads, as in the workers
                results[position] = work(items[position])
        finally:
            torch.set_num_threads(threads)
        return [results[position] for position in range(len(items))]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = _run(fused_experts_forward, experts, x, index, weights, dtype)
        monkeypatch.setattr(fast_experts, "map_in_worker_threads", last_group_first)
        in_reverse = _run(fused_experts_forward, experts, x, index, weights, dtype)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(threaded, in_reverse, strict=True):
        assert torch.equal(a, b)


def test_workers_are_at_most_max_k_2_and_share_the_intra_op_threads(monkeypatch):
    """8 intra-op threads and k=2: two workers of 4 threads each (two per-token sums at most, not eight)."""
    experts = _experts("relu", num_experts=8, hidden=16, intermediate=8)
    index, weights = _busy_routing()
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 10 * 16 * 4)  # 10-row blocks: 40 of them
    worker_threads: dict[str, int] = {}
    up_and_hidden = fast_experts._up_and_hidden

    def recording(*args, **kwargs):
        worker_threads[threading.current_thread().name] = torch.get_num_threads()
        return up_and_hidden(*args, **kwargs)

    monkeypatch.setattr(fast_experts, "_up_and_hidden", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        with torch.no_grad():
            fused_experts_forward(experts, torch.randn(200, 16), index, weights)
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(threads)
    assert len(worker_threads) == 2 and set(worker_threads.values()) == {4}
    assert all(name.startswith("moe_fused") for name in worker_threads)


def test_groups_in_threads_under_inference_mode(monkeypatch):
    experts = _experts("swiglu", num_experts=8, hidden=16, intermediate=8)
    index, weights = _busy_routing()
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 40 * 16 * 4)
    x = torch.randn(200, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one group, no worker threads
        with torch.no_grad():
            reference = fused_experts_forward(experts, x, index, weights)
        torch.set_num_threads(2)
        with torch.inference_mode():
            output = fused_experts_forward(experts, x, index, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(output, reference, atol=1e-6)


def test_generic_activation_falls_back_to_autograd():
    experts = _experts("relu")
    experts.act_fn = torch.nn.GELU()
    x = torch.randn(9, 16)
    index, weights = _routing(9, 6, 2)
    _assert_matches_eager(experts, x, index, weights)


def _assert_bf16_close(activation: str, device: str = "cpu", num_experts: int = 6, num_tokens: int = 33) -> None:
    experts = _experts(activation, num_experts, hidden=16, intermediate=32).to(device)
    x = torch.randn(num_tokens, 16, device=device)
    index, weights = (t.to(device) for t in _routing(num_tokens, num_experts, 2))
    reference = _run(_experts_eager_forward, experts, x, index, weights)
    experts.to(torch.bfloat16)
    fused = _run(fused_experts_forward, experts, x, index, weights, dtype=torch.bfloat16)
    eager = _run(_experts_eager_forward, experts, x, index, weights, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in fused)
    for a, b, c in zip(reference, fused, eager, strict=True):
        assert torch.isfinite(b).all()
        # No worse than the eager path in bf16 (fp32 accumulation in the matmuls and the sum over the k slots).
        assert (a - b.float()).norm() <= 1.5 * (a - c.float()).norm() + 1e-3 * a.norm()


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_bf16_runs_and_is_close(activation):
    _assert_bf16_close(activation)


@pytest.fixture
def cuda_branch_on_cpu(monkeypatch):
    """The branch `moe_fused` takes on CUDA in bf16 (all rows in one block, each product one `grouped_mm`, per-token
    sums in pair order), run on the CPU, where `grouped_mm` has a reference kernel: no GPU was available to this
    project. Returns the shapes of the first operands of the `grouped_mm` calls made."""
    calls = []
    grouped_mm = torch.nn.functional.grouped_mm

    def counting_grouped_mm(a, b, *args, offs, **kwargs):
        calls.append(tuple(a.shape))
        # What torch's CUDA kernel checks, on meta tensors of the same sizes and strides in bf16 (the dtype the branch
        # runs in there): `_grouped_mm`'s meta function mirrors `_grouped_mm_cuda`'s checks (operand strides aligned
        # to 16 bytes, one of them 1; int32 offsets); then what it checks on the device: 16-byte aligned pointers and,
        # for its grouped kernel, fewer than 1024 groups.
        meta = [torch.empty_strided(t.shape, t.stride(), dtype=torch.bfloat16, device="meta") for t in (a, b)]
        torch._grouped_mm(*meta, offs=offs.to("meta"))
        assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
        assert offs.numel() < 1024
        return grouped_mm(a, b, *args, offs=offs, **kwargs)

    monkeypatch.setattr(fast_experts, "_grouped_mm_ok", lambda a, b: True)
    monkeypatch.setattr(fast_experts, "_sums_pairwise", lambda device: True)
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting_grouped_mm)
    return calls


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("case", ["random", "empty_experts", "sentinel", "recompute"])
def test_cuda_grouped_mm_branch_matches_eager(cuda_branch_on_cpu, activation, case):
    experts = _experts(activation, expert_recompute_activations=case == "recompute")
    x = torch.randn(21, 16)
    index, weights = _routing(21, 6, 2, experts_used=3 if case == "empty_experts" else None)
    if case == "sentinel":
        index[0, 1] = 6
        index[5] = 6  # a token with no local expert at all
    _assert_matches_eager(experts, x, index, weights)
    # One call per product over all rows: up and down in forward (up again in backward when recomputing), then the
    # down projection's input gradient, the two weight gradients (over the rows' transposes), the input gradient.
    rows, up_width = int((index < 6).sum()), 48 if activation == "swiglu" else 24
    forward, recomputed = [(rows, 16), (rows, 24)], [(rows, 16)] * (case == "recompute")
    backward = [(rows, 16), (16, rows), (up_width, rows), (rows, up_width)]
    assert cuda_branch_on_cpu == forward + recomputed + backward


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_cuda_grouped_mm_branch_zeroes_the_weight_gradients_of_experts_without_rows(
    cuda_branch_on_cpu, monkeypatch, activation
):
    """A grouped kernel need not write the output groups that have no rows (the CPU reference kernel writes zeros, a
    CUDA kernel may leave what the memory held): the weight gradients of the experts no token reached are still 0."""
    grouped_mm = torch.nn.functional.grouped_mm  # the fixture's counting wrapper

    def leaves_empty_groups_unwritten(a, b, *args, offs, **kwargs):
        out = grouped_mm(a, b, *args, offs=offs, **kwargs)
        if out.dim() == 3:  # (groups, M, N): a weight gradient
            out[torch.diff(offs, prepend=offs.new_zeros(1)) == 0] = float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", leaves_empty_groups_unwritten)
    experts = _experts(activation)
    index, weights = _routing(21, 6, 2, experts_used=3)  # experts 3..5 get no row
    _assert_matches_eager(experts, torch.randn(21, 16), index, weights)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("recompute", [False, True])
def test_cuda_grouped_mm_branch_uses_the_kernel_outputs_without_copying_them(cuda_branch_on_cpu, activation, recompute):
    """At a few hundred rows per expert each product is bound by memory traffic on a GPU: copying a `grouped_mm` output
    (activations, or an `(experts, M, N)` weight gradient) into another tensor would add a pass as long as the
    product's own. No `grouped_mm` output is the source of a copy; the weight gradients are those outputs."""

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            # Weak references: a strong one would keep autograd from taking a gradient as it is (it would copy it).
            self.outputs, self.copied = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._grouped_mm.default:
                self.outputs.append(weakref.ref(out))
            elif func is torch.ops.aten.copy_.default:
                source = args[1].untyped_storage().data_ptr()
                live = [output() for output in self.outputs]
                if any(o is not None and o.untyped_storage().data_ptr() == source for o in live):
                    self.copied.append(tuple(args[1].shape))
            return out

    experts = _experts(activation, expert_recompute_activations=recompute)
    index, weights = _routing(21, 6, 2, experts_used=4)  # experts 4 and 5 get no row: their gradients zeroed
    with Copies() as mode:
        _assert_matches_eager(experts, torch.randn(21, 16), index, weights)
    assert len(cuda_branch_on_cpu) == 6 + recompute and mode.copied == []


class _SaysCuda:
    """A CPU tensor that reports a CUDA device: `_grouped_mm_ok`'s checks without a GPU."""

    device = torch.device("cuda", 0)

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


@pytest.mark.parametrize(
    ("capability", "num_experts", "dtype", "expected"),
    [
        ((9, 0), 64, torch.bfloat16, True),  # H100 / H200: torch's CUTLASS grouped kernel
        ((10, 0), 1023, torch.bfloat16, True),  # B200: the most groups that kernel takes
        ((9, 0), 1024, torch.bfloat16, False),  # "Can't process more than 1024 groups" (a RuntimeError)
        ((8, 0), 64, torch.bfloat16, False),  # A100: `_grouped_mm_fallback`, a loop of mm after copying offs to host
        ((8, 9), 64, torch.bfloat16, False),  # L4 / L40S: the same fallback
        ((12, 0), 64, torch.bfloat16, False),  # consumer Blackwell: the same fallback
        ((9, 0), 64, torch.float16, False),  # the grouped kernel is bf16 only
        ((9, 0), 64, torch.float32, False),
    ],
)
def test_grouped_mm_only_where_cuda_runs_its_grouped_kernel(monkeypatch, capability, num_experts, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x = torch.randn(8, 16, dtype=dtype)
    up_t = torch.randn(num_experts, 24, 16, dtype=dtype).transpose(1, 2)  # (n, in, out) view, as the experts use it
    assert fast_experts._grouped_mm_ok(_SaysCuda(x), _SaysCuda(up_t)) is expected


def test_grouped_mm_needs_every_operand_width_aligned(monkeypatch):
    """Each product's 2-D operands are new `(rows, width)` tensors (or their transposes) of width hidden, up width or
    expert hidden: CUDA's `grouped_mm` wants each of those strides a multiple of 16 bytes. Experts stored `(n, in,
    out)` (`is_transposed`) with an expert hidden of 12 have aligned weight strides (2 * 12, 16) but rows of 12 bf16
    values, which the kernel refuses; the per-expert matmuls take them."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    num_experts, hidden, intermediate = 4, 16, 12
    x = torch.randn(10, hidden, dtype=torch.bfloat16)
    gate_up = torch.randn(num_experts, hidden, 2 * intermediate, dtype=torch.bfloat16)  # (n, in, out) storage
    down = torch.randn(num_experts, intermediate, hidden, dtype=torch.bfloat16)
    up_t, down_t = gate_up, down  # as `_experts_forward` sees them: the (n, out, in) views, transposed back
    offs = torch.tensor([3, 6, 8, 10], dtype=torch.int32, device="meta")
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):  # the kernel's own check (its meta function)
        torch._grouped_mm(
            torch.empty(10, intermediate, dtype=torch.bfloat16, device="meta"), down_t.to("meta"), offs=offs
        )
    assert fast_experts._grouped_mm_ok(_SaysCuda(x), _SaysCuda(up_t))  # hidden 16, up width 24: aligned
    assert not fast_experts._grouped_mm_ok(_SaysCuda(x), _SaysCuda(down_t))


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("branch", ["cpu_blocks", "cuda_grouped_mm"])
def test_autocast_runs_the_products_in_its_dtype(request, activation, branch):
    """Under `torch.autocast` (`Trainer(bf16=True)` keeps float32 weights) the experts' products run in bf16, as the
    eager experts' `F.linear` do: `torch.mm(..., out=...)` and `grouped_mm` are no autocast ops, so without a cast they
    ran in float32, and on CUDA never reached the grouped kernel (bf16 only). The float32 weights get float32
    gradients, and the result is as close to float32's as eager's under autocast."""
    if branch == "cuda_grouped_mm":
        request.getfixturevalue("cuda_branch_on_cpu")

    class ProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten._grouped_mm.default):
                self.dtypes |= {args[0].dtype, args[1].dtype}
            return func(*args, **(kwargs or {}))

    def under_autocast(fn):
        def run(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)

        return run

    experts = _experts(activation, hidden=16, intermediate=32)
    x = torch.randn(33, 16)
    index, weights = _routing(33, 6, 2)
    reference = _run(fused_experts_forward, experts, x, index, weights)
    eager = _run(under_autocast(_experts_eager_forward), experts, x, index, weights)
    with ProductDtypes() as mode:
        fused = _run(under_autocast(fused_experts_forward), experts, x, index, weights)
    assert mode.dtypes == {torch.bfloat16}
    for a, b, c in zip(reference, fused, eager, strict=True):
        assert (a - b.float()).norm() <= 1.5 * (a - c.float()).norm() + 1e-3 * a.norm()
    assert all(grad.dtype == torch.float32 for grad in fused[1:])


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_cuda_grouped_mm_branch_in_bf16_is_close(cuda_branch_on_cpu, activation):
    _assert_bf16_close(activation)
    assert cuda_branch_on_cpu


@pytest.mark.parametrize("branch", ["cpu_blocks", "cuda_grouped_mm"])
def test_bf16_sums_over_the_slots_round_once(request, monkeypatch, branch):
    """In bf16 the per-token sums over the k slots (output and input gradient) accumulate in fp32 and round once.

    Integer inputs, expert weights and output gradient in {-1, 0, 1} (hidden size and expert width 16) and routing
    weights 2^-j (j < 8) make every per-slot product exact in bf16 (integers of at most 256 times a power of two),
    while their sum over k = 8 of 16 experts needs more than bf16's 8 significant bits. So the only rounding allowed is
    the final one: output, input gradient, routing-weight gradient and expert weight gradients equal the float64
    results rounded to bf16, bit for bit. With blocks of 16 rows (each token's slots added by several blocks, as in any layer larger than a block),
    a bf16 accumulator would round every partial sum and miss this on many entries.
    """
    if branch == "cuda_grouped_mm":
        request.getfixturevalue("cuda_branch_on_cpu")
    num_tokens, num_experts, top_k, size = 64, 16, 8, 16
    experts = _experts("relu", num_experts, hidden=size, intermediate=size)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in experts.parameters():
            weight.copy_(torch.randint(-1, 2, weight.shape, generator=generator))
    x = torch.randint(-1, 2, (num_tokens, size), generator=generator).double()
    index, _ = _routing(num_tokens, num_experts, top_k, seed=0)
    weights = torch.exp2(-torch.randint(0, 8, (num_tokens, top_k), generator=generator).double())
    grad_out = torch.randint(-1, 2, (num_tokens, size), generator=generator).double()

    # Float64 reference, slot by slot: y_t = sum_j w_tj * down[e_tj] relu(up[e_tj] x_t).
    x_ref, weights_ref = x.clone().requires_grad_(), weights.clone().requires_grad_()
    up_ref, down_ref = (p.detach().double().requires_grad_() for p in (experts.up_proj, experts.down_proj))
    up, down = up_ref[index], down_ref[index]
    hidden = torch.einsum("tkih,th->tki", up, x_ref).relu()
    slots = weights_ref[..., None] * torch.einsum("tkhi,tki->tkh", down, hidden)  # (tokens, k, hidden)
    reference = slots.sum(dim=1)
    (reference * grad_out).sum().backward()
    assert torch.equal(slots, slots.bfloat16().double())  # every per-slot product is exact in bf16
    rounded = reference.detach().bfloat16()
    assert (rounded.double() != reference).double().mean() > 0.25  # many sums need the final rounding
    bf16_running_sum = torch.zeros_like(rounded)
    for slot in range(top_k):
        bf16_running_sum += slots[:, slot].detach().bfloat16()
    assert (bf16_running_sum != rounded).double().mean() > 0.05  # which a bf16 accumulator misses

    experts.to(torch.bfloat16)
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 16 * size * 2)  # 16 bf16 rows of the up projection per block
    x, weights = x.bfloat16().requires_grad_(), weights.bfloat16().requires_grad_()
    output = fused_experts_forward(experts, x, index, weights)
    (output * grad_out.bfloat16()).sum().backward()
    for name, result, expected in [
        ("output", output.detach(), rounded),
        ("grad input", x.grad, x_ref.grad.bfloat16()),
        ("grad routing weights", weights.grad, weights_ref.grad.bfloat16()),
        # Each expert's 32 rows span two blocks: its weight gradient too is summed in fp32 and rounded once.
        ("grad up_proj", experts.up_proj.grad, up_ref.grad.bfloat16()),
        ("grad down_proj", experts.down_proj.grad, down_ref.grad.bfloat16()),
    ]:
        assert result.dtype == torch.bfloat16
        assert torch.equal(result, expected), (name, (result != expected).double().mean().item())


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_recompute_gives_identical_gradients_and_saves_memory(activation):
    experts = _experts(activation)
    x = torch.randn(40, 16)
    index, weights = _routing(40, 6, 2)
    stored = _run(fused_experts_forward, experts, x, index, weights)

    saved = {}
    for recompute in (False, True):
        experts.config.expert_recompute_activations = recompute
        sizes = []

        def pack(tensor, sizes=sizes):
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = _run(fused_experts_forward, experts, x, index, weights)
        saved[recompute] = sum(sizes)
        for a, b in zip(stored, result, strict=True):
            assert torch.equal(a, b)
    # Without recomputation the (rows, intermediate) activations and gathered inputs are kept; with it, neither.
    rows = 40 * 2
    assert saved[False] - saved[True] >= rows * 24 * 4


def test_bad_routing_raises():
    experts = _experts("relu")
    x = torch.randn(3, 16)
    with pytest.raises(ValueError, match="negative expert id -1"):
        fused_experts_forward(experts, x, torch.tensor([[0, -1]] * 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="top_k_index"):
        fused_experts_forward(experts, x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 3))


def _tiny_model(**kwargs):
    config = MoEConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_experts=6,
        num_experts_per_tok=2,
        expert_intermediate_size=24,
        router_type="softmax_top_k",
        **kwargs,
    )
    torch.manual_seed(0)
    model = MoEForCausalLM(config)
    with torch.no_grad():  # the zero-initialised gate would route every token alike
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=0.5)
    return model


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_selection_by_name_and_default(tmp_path, activation):
    model = _tiny_model(expert_activation=activation)
    # The fused path is the model's default (it beat grouped_mm in training: README, Performance); OLMoE's stays.
    assert model.config._experts_implementation == FAST_EXPERTS_IMPLEMENTATION
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("eager", "grouped_mm", "batched_mm", FAST_EXPERTS_IMPLEMENTATION):
        loaded = MoEForCausalLM.from_pretrained(tmp_path, experts_implementation=name).train()
        assert loaded.config._experts_implementation == name
        out = loaded(input_ids=ids, labels=ids)
        out.loss.backward()
        results[name] = (out.logits, {n: p.grad for n, p in loaded.named_parameters() if p.grad is not None})
    assert MoEForCausalLM.from_pretrained(tmp_path).config._experts_implementation == FAST_EXPERTS_IMPLEMENTATION
    eager_logits, eager_grads = results["eager"]
    fused_logits, fused_grads = results[FAST_EXPERTS_IMPLEMENTATION]
    assert torch.allclose(eager_logits, fused_logits, atol=1e-5)
    with torch.no_grad():  # inference stores nothing for a backward and gives the same logits
        assert torch.allclose(MoEForCausalLM.from_pretrained(tmp_path)(input_ids=ids).logits, eager_logits, atol=1e-5)
    for implementation in ("grouped_mm", "batched_mm", FAST_EXPERTS_IMPLEMENTATION):
        logits, grads = results[implementation]
        assert torch.allclose(eager_logits, logits, atol=1e-5), implementation
        assert eager_grads.keys() == grads.keys()
        for name, grad in eager_grads.items():
            assert torch.allclose(grad, grads[name], atol=1e-5), (implementation, name)

    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    model.set_experts_implementation(FAST_EXPERTS_IMPLEMENTATION)
    assert model.config._experts_implementation == FAST_EXPERTS_IMPLEMENTATION
    with pytest.raises(ValueError, match="not_an_implementation"):
        model.set_experts_implementation("not_an_implementation")


def test_model_recompute_matches_stored():
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    grads = []
    for recompute in (False, True):
        model = _tiny_model(expert_recompute_activations=recompute).train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_registered_for_other_models():
    model = tiny_olmoe()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    model.set_experts_implementation("eager")
    reference = model(input_ids=ids).logits
    model.set_experts_implementation(FAST_EXPERTS_IMPLEMENTATION)
    assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-5)


def test_benchmark_quick_run_writes_its_tables(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--mode", "both", "--output-dir", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    layer = (tmp_path / "benchmark_layer.md").read_text()
    assert "| experts | k | tokens |" in layer and "\n| 16 | 2 | 64 |" in layer
    model = (tmp_path / "benchmark_model.md").read_text()
    assert "OlmoeForCausalLM" in model and "MoEForCausalLM" in model
    # Per model and experts count, every experts implementation does the same counted FLOPs per training step.
    model_rows = [line.strip("|").split("|") for line in model.splitlines() if "ForCausalLM (" in line]
    flops = {}
    for row in model_rows:
        flops.setdefault((row[0].split(" (")[0], row[1]), set()).add(float(row[5]))
    assert len(flops) == 4 and all(len(values) == 1 and values.pop() > 0 for values in flops.values())
    # training step peak MiB added: measured for every variant on Linux with glibc's malloc, else "-"
    measured = can_measure_resident_growth()
    assert all(float(row[9]) >= 0 if measured else row[9].strip() == "-" for row in model_rows)
    assert (tmp_path / "benchmark_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    assert f"torch {torch.__version__}, {allocator_name()}" in layer.splitlines()[0]  # same environment as here


def test_benchmark_measures_the_peak_memory_recomputation_saves(tmp_path):
    """On a CPU the layer table's peak memory is the resident set's growth, measured in a new process whose malloc
    follows the live memory: recomputing the expert activations (SPEC §6) lowers it by the hidden activations it
    does not store, less the blocks' activations it recomputes at a time (a few MiB per worker thread)."""
    if not can_measure_resident_growth():
        pytest.skip("peak memory on a CPU is measured under glibc's malloc on Linux")
    tokens, top_k, expert_hidden = 8192, 2, 1024
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--experts", "8", "--top-k", str(top_k)]
    command += ["--tokens", str(tokens), "--hidden", "64", "--expert-hidden", str(expert_hidden), "--repeats", "1"]
    command += ["--implementations", FAST_EXPERTS_IMPLEMENTATION, "grouped_mm", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in (tmp_path / "benchmark_layer.md").read_text().splitlines() if line.startswith("| 8 "))
    dense, fused, recomputed, grouped = map(float, row.strip("|").split("|")[-1].split("/"))
    hidden_activations = tokens * top_k * expert_hidden * 4 / 2**20  # (tokens * k, expert hidden) fp32: 64 MiB
    assert 0.75 * hidden_activations <= fused - recomputed <= hidden_activations + 2, row
    # every forward+backward at least allocates the input's gradient and the activations it keeps for backward
    input_grad = tokens * 64 * 4 / 2**20
    assert dense > input_grad + hidden_activations and grouped > input_grad + hidden_activations, row
    assert recomputed > input_grad, row


def test_benchmark_gemm_mode_times_every_variant(tmp_path):
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--mode", "gemm"]
    result = subprocess.run([*command, "--output-dir", tmp_path], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / "benchmark_gemm.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| experts")).strip("|").split("|")
    columns = [cell.strip() for cell in header]
    table = [line.strip("|").split("|") for line in lines if line.startswith("| 4 ") or line.startswith("| 16 ")]
    # --quick: 64 tokens x k=2 over 4 and 16 experts -> 32 and 8 rows per expert
    assert [(int(row[0]), int(row[3])) for row in table] == [(4, 32), (16, 8)]
    always = ["one mm", "mm per expert", "bmm"]
    # on a CPU with more than one intra-op thread, also shared out over worker threads as moe_fused does
    in_workers = [MM_IN_WORKERS, BMM_IN_WORKERS] if torch.get_num_threads() > 1 else []
    for row in table:
        rates = {name: float(row[columns.index(f"{name} GFLOP/s")]) for name in always + in_workers}  # "-": not run
        assert all(rates[name] > 0 for name in always + in_workers), rates


def test_benchmark_rejects_bad_arguments(tmp_path):
    def run(*options: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *options, "--output-dir", tmp_path]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    result = run("--experts", "0")
    assert result.returncode != 0 and "--experts values must be positive, got [0]" in result.stderr
    result = run("--device", "gpu0")
    assert result.returncode != 0 and "--device 'gpu0' is not a torch device" in result.stderr
    assert "Traceback" not in result.stderr


def test_benchmark_tables_get_ordinary_file_permissions(tmp_path):
    """Tables and plots go through a private temporary file (mkstemp: 0600); the results must be readable as any file
    the user writes (they once stayed 0600, unreadable to anyone else, unlike the reproduction scripts' files)."""
    import os
    import stat

    from modeling_moe.cli.files import write_atomically

    umask = os.umask(0o022)
    try:
        write_atomically(tmp_path / "results" / "table.md", "| a |\n")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "results" / "table.md").stat().st_mode) == 0o644
    assert (tmp_path / "results" / "table.md").read_text() == "| a |\n"
    write_atomically(tmp_path / "results" / "plot.png", lambda tmp: Path(tmp).write_bytes(b"\x89PNG"))
    assert (tmp_path / "results" / "plot.png").read_bytes() == b"\x89PNG"

    def fails_halfway(tmp: str) -> None:
        Path(tmp).write_text("half a tab")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a failed write leaves neither a file nor a temporary one
        write_atomically(tmp_path / "results" / "other.md", fails_halfway)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["plot.png", "table.md"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--experts", "2", "--top-k", "4"], "no runnable combination of --experts and --top-k"),
        (["--mode", "gemm", "--experts", "1024", "--top-k", "2", "--tokens", "64"], "no runnable combination"),
        (["--mode", "model", "--hidden", "36", "--heads", "4"], "into an even head size"),
        (["--quick", "--experts", "2", "--top-k", "4"], "experts \\[2\\], top-k \\[4\\]"),
    ],
)
def test_benchmark_rejects_sweeps_that_cannot_run(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


def test_benchmark_layer_takes_any_hidden_size():
    from modeling_moe.cli.benchmark import layer_and_dense

    args = parse_args(["--quick", "--hidden", "33", "--activation", "relu"])  # the layer has no attention heads
    config, layer, dense, x, _ = layer_and_dense(args, 4, 2, 16, torch.device("cpu"), torch.float32)
    assert x.shape == (16, 33) and config.hidden_size == 33


def test_benchmark_layer_table_reports_every_implementation_it_timed():
    """`--implementations ... batched_mm` is accepted and timed: the table must show it (it once had no column)."""
    from modeling_moe.cli.benchmark import RECOMPUTE, _layer_table

    args = parse_args(["--quick", "--implementations", FAST_EXPERTS_IMPLEMENTATION, "batched_mm"])
    times = {"dense": 1.0, FAST_EXPERTS_IMPLEMENTATION: 2.0, "batched_mm": 5.0}
    row = {
        "experts": 4, "k": 2, "tokens": 64, "times": times, "recompute_time": 2.2,
        "memory": {name: (2**20, None) for name in times}, "recompute_memory": (2**20, None),
        "fused_tokens_per_s": 32.0, "dense_tokens_per_s": 64.0,
    }  # fmt: skip
    assert RECOMPUTE not in row["times"]
    header, rule, line = _layer_table([row], args).splitlines()
    assert header.endswith("| batched_mm / dense | fused speed-up vs batched_mm |")
    assert header.count("|") == rule.count("|") == line.count("|")
    assert line.endswith("| 5.00 | 2.50 |")  # 5 s against dense's 1 s, and against moe_fused's 2 s
    # Without batched_mm the table keeps its columns.
    args = parse_args(["--quick", "--implementations", FAST_EXPERTS_IMPLEMENTATION, "grouped_mm"])
    assert "batched_mm" not in _layer_table([row], args)


def test_benchmark_quick_keeps_the_values_given():
    args = parse_args(["--quick", "--experts", "64", "--repeats", "9"])
    assert (args.experts, args.repeats) == ([64], 9)
    assert (args.top_k, args.hidden, args.tokens) == ([2], 32, [64])  # the rest: quick sizes


def test_benchmark_defaults_to_bf16_on_cuda():
    """The GPU question (bf16 MoE layer within 1.3x of the dense FFN, no slower than grouped_mm) is bf16's: `--device
    cuda` measures it without `--dtype`; the CPU keeps float32, and a `--dtype` given is kept."""
    assert parse_args(["--quick", "--device", "cuda"]).dtype == "bfloat16"
    assert parse_args(["--quick", "--device", "cuda:1"]).dtype == "bfloat16"
    assert parse_args(["--quick", "--device", "cpu"]).dtype == "float32"
    assert parse_args(["--quick", "--device", "cuda", "--dtype", "float32"]).dtype == "float32"


def test_benchmark_leaves_out_grouped_mm_where_torch_refuses_its_expert_count(monkeypatch, capsys):
    """On CUDA in bf16 at compute capability 9.x / 10.x torch's `grouped_mm` raises for 1024 groups or more ("Can't
    process more than 1024 groups"): the default sweep (up to 1024 experts) would stop there. transformers' grouped_mm
    variants are left out of those sweep points (shown as "-"), the rest is measured."""
    from modeling_moe.cli.benchmark import (
        OLMOE_REFERENCE,
        _layer_variants,
        _model_table,
        _model_variants,
        grouped_mm_refuses,
        layer_and_dense,
    )

    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert grouped_mm_refuses(1024, cuda, bf16) and not grouped_mm_refuses(1023, cuda, bf16)
    assert not grouped_mm_refuses(1024, cuda, torch.float32)  # the fallback loop takes any count
    assert not grouped_mm_refuses(1024, torch.device("cpu"), bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not grouped_mm_refuses(4096, cuda, bf16)

    args = parse_args(["--quick", "--activation", "relu"])
    _, layer, dense, _, _ = layer_and_dense(args, 4, 2, 16, torch.device("cpu"), torch.float32)
    assert "grouped_mm" in _layer_variants(args, 4, layer, dense)
    variants = _layer_variants(args, 4, layer, dense, grouped_mm_runs=False)
    assert "grouped_mm" not in variants and FAST_EXPERTS_IMPLEMENTATION in variants
    models = _model_variants(layer, dense, grouped_mm_runs=False)
    assert OLMOE_REFERENCE not in models and all(impl == FAST_EXPERTS_IMPLEMENTATION for _, impl in models.values())
    row = {
        "model": "MoEForCausalLM (moe_fused)", "experts": 1024, "k": 4, "train_tokens_per_s": 10.0,
        "train_gflop_per_step": 1.0, "train_gflops": 2.0, "one_mm_gflops": 3.0, "train_share_of_mm": 0.5,
        "train_peak_bytes_added": 2**20, "generate_tokens_per_s": 5.0, "train_vs_olmoe": None,
        "generate_vs_olmoe": None,
    }  # fmt: skip
    line = _model_table([row], header=False)
    assert line.startswith("| MoEForCausalLM (moe_fused) | 1024 | 4 | 10 | - |") and line.endswith("| 5.0 | - |")


def test_worker_threads_benchmark_compares_with_one_group(monkeypatch, tmp_path):
    """scripts/benchmark_worker_threads.py: its "one group" variant really runs without worker threads, and a tiny run
    writes its table."""
    spec = importlib.util.spec_from_file_location(
        "benchmark_worker_threads", ROOT / "scripts" / "benchmark_worker_threads.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    index, _ = _busy_routing()
    routing = fast_experts._SortedRouting(index, 8, 40, grouped=False)
    with script.one_group():
        assert routing.block_groups(2) == [routing.blocks]
    assert len(routing.block_groups(2)) == 2
    monkeypatch.setattr(fast_experts, "BLOCK_BYTES", 64 * 64 * 4)  # several blocks at these sizes
    output = tmp_path / "worker_threads.md"
    arguments = ["--experts", "4", "--tokens", "128", "--hidden", "32", "--expert-hidden", "64", "--repeats", "1"]
    text = script.main([*arguments, "--output", str(output)])
    assert output.read_text() == text
    row = next(line for line in text.splitlines() if line.startswith("| 4 |")).strip("|").split("|")
    assert int(row[1]) == 128 * 4 // 4 and all(float(cell) > 0 for cell in row[2:])
