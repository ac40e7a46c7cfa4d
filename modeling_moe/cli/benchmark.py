"""`moe-bench`: speed and memory of the MoE layer and model against the dense equivalent and transformers' paths.

Layer mode (SPEC §6-7: "capacity at nearly constant cost per token"): for every (experts, k, tokens) it times
forward+backward of one MoE layer (a softmax top-k gate and the experts, through each experts implementation) and of
the dense feed-forward layer with the same active parameters (hidden `k * expert_hidden`), running the variants in a
new random order every repeat and taking the median, and reports tokens/s, the ratio of each time to the dense one,
the speed-up of `moe_fused` over transformers' `eager` and `grouped_mm`, and memory: the bytes saved for backward
(exact, any device) and the peak memory one forward+backward adds to what was allocated before (weights and input;
their gradients count, as the call allocates them): on CUDA the allocator's peak, on a CPU the peak growth of the
resident set (`cpu_malloc.peak_resident_growth`, in a new process).

Model mode: training (forward+backward) and greedy generation tokens/s of `MoEForCausalLM` (with `moe_fused` and with
transformers' `grouped_mm`) against transformers' `OlmoeForCausalLM` (with `grouped_mm`, and with `moe_fused`, which
isolates what the rest of each model costs) at matching sizes (SwiGLU experts, like OLMoE's, unless
`--activation relu`). Each training step's matmul FLOPs are counted (`flop_count.py`) and set against the rate of one
large matmul timed among the steps, `(batch * seq_len, hidden) @ (hidden, k * expert_hidden)`: a step can at best run
at that rate, which bounds the tokens/s of any implementation of the same model on the machine. Each training step's
peak memory is measured as in layer mode (the parameters' gradients count).

Gemm mode: the shrinking batch alone (SPEC §6): the experts' up-projection matmuls with `tokens * k / experts` rows
each, as per-expert `mm`s, one `bmm` and one `grouped_mm`, and on a CPU the `mm`s and the `bmm` shared out over worker
threads as `moe_fused` shares out its blocks, in GFLOP/s against one `mm` of all rows by one weight.

    moe-bench --quick                       # tiny sizes, under a minute on 2 CPU cores
    moe-bench --experts 8 64 256 1024 --top-k 4 --tokens 4096 --device cpu
    moe-bench --device cuda                 # bf16 (the default on CUDA): layer vs dense FFN and grouped_mm
    moe-bench --mode model --device cuda --dtype bfloat16
    moe-bench --mode gemm --experts 64 256 1024 --top-k 4 --tokens 4096
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import math
import multiprocessing
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from ..configuration_moe import MoEConfig
from ..fast_experts import (
    FAST_EXPERTS_IMPLEMENTATION,
    GROUPED_MM_MAX_GROUPS,
    map_in_worker_threads,
    torch_runs_grouped_kernel,
    worker_thread_count,
)
from ..modeling_moe import MoEExperts, MoEForCausalLM, MoEGatedExperts
from ..training.arguments import check_output_dir
from .cpu_malloc import allocator_name, can_measure_resident_growth, malloc_for_measuring, peak_resident_growth
from .files import write_atomically
from .flop_count import training_step_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYER_IMPLEMENTATIONS = (FAST_EXPERTS_IMPLEMENTATION, "grouped_mm", "eager")
RECOMPUTE = f"{FAST_EXPERTS_IMPLEMENTATION}+recompute"
ONE_MM = "one mm"
MM_IN_WORKERS = "mm per expert in worker threads"
BMM_IN_WORKERS = "bmm in worker threads"


def grouped_mm_refuses(num_experts: int, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's `grouped_mm` raises for this many experts ("Can't process more than 1024 groups"): on CUDA in
    bf16 at compute capability 9.x / 10.x it is a grouped kernel that takes fewer than 1024 groups (`fast_experts`;
    `moe_fused` does not call it there). Transformers' `grouped_mm` experts would fail the whole sweep."""
    return num_experts > GROUPED_MM_MAX_GROUPS and torch_runs_grouped_kernel(device, dtype)


def _skip_grouped_mm(num_experts: int, device: torch.device, dtype: torch.dtype) -> bool:
    """`grouped_mm_refuses`, saying so when it does."""
    refuses = grouped_mm_refuses(num_experts, device, dtype)
    if refuses:
        print(f"experts={num_experts}: grouped_mm skipped (torch's grouped kernel takes fewer than 1024)", flush=True)
    return refuses


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_times(
    variants: dict[str, Callable[[], None]],
    repeats: int,
    device: torch.device,
    reset: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median wall time of each variant; one warm-up each, then every repeat runs all variants in a new random order.

    The order is shuffled because on a CPU one variant's memory traffic (GiBs of gradients freed and mapped afresh)
    changes the next one's time. `reset` runs untimed before every call (dropping the gradients the previous variant
    left: freeing them would otherwise be charged to whichever variant runs next).
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = random.Random(0)
    for fn in variants.values():
        if reset is not None:
            reset()
        fn()
    for _ in range(repeats):
        for name in order.sample(list(variants), len(variants)):
            fn = variants[name]
            if reset is not None:
                reset()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn` builds its graph."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    out.float().sum().backward()
    return sum(storages.values())


def _peak_cuda_bytes_added(fn: Callable[[], None], device: torch.device, reset: Callable[[], None]) -> int:
    """Peak CUDA memory `fn` allocates above what is allocated before it (after `reset`)."""
    reset()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


class _DenseFFN(nn.Module):
    """The dense equivalent of a MoE layer: one FFN of hidden `k * expert_hidden`, the experts' activation."""

    def __init__(self, hidden: int, intermediate: int, gated: bool) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, (2 if gated else 1) * intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)
        self.gated = gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(nn.functional.silu(gate) * up)
        return self.down(torch.relu(h))


class _MoELayer(nn.Module):
    """A softmax top-k gate (SPEC §2 without noise) and the experts, dispatched by `config._experts_implementation`."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = MoEGatedExperts(config) if config.expert_activation == "swiglu" else MoEExperts(config)
        self.top_k = config.num_experts_per_tok
        for weight in self.experts.parameters():
            nn.init.normal_(weight, std=config.hidden_size**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        top_logits, top_index = logits.topk(self.top_k, dim=-1)
        return self.experts(x, top_index, torch.softmax(top_logits.float(), dim=-1).to(x.dtype))


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _mib(nbytes: int | None) -> str:
    return _fmt(None if nbytes is None else nbytes / 2**20, ".0f")


def layer_and_dense(
    args: argparse.Namespace, num_experts: int, top_k: int, num_tokens: int, device: torch.device, dtype: torch.dtype
) -> tuple[MoEConfig, _MoELayer, _DenseFFN, torch.Tensor, Callable[[], None]]:
    """(config, MoE layer, dense FFN with its active parameters, input `(num_tokens, hidden)`, drop their gradients)
    for `args.hidden`, `args.expert_hidden` and `args.activation`, seeded."""
    torch.manual_seed(0)
    config = MoEConfig(
        hidden_size=args.hidden,
        num_attention_heads=1,
        head_dim=2,  # the layer alone: any hidden size, the attention geometry is unused
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        expert_intermediate_size=args.expert_hidden,
        expert_activation=args.activation,
    )
    layer = _MoELayer(config).to(device=device, dtype=dtype)
    gated = args.activation == "swiglu"
    dense = _DenseFFN(args.hidden, top_k * args.expert_hidden, gated).to(device=device, dtype=dtype)
    x = torch.randn(num_tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    params = [x, *layer.parameters(), *dense.parameters()]

    def drop_grads() -> None:
        for p in params:
            p.grad = None

    return config, layer, dense, x, drop_grads


# A layer benchmark variant: (module, experts implementation or None for the dense FFN, recompute activations)
_Variant = tuple[nn.Module, str | None, bool]


def _layer_variants(
    args: argparse.Namespace, num_experts: int, layer: _MoELayer, dense: _DenseFFN, grouped_mm_runs: bool = True
) -> dict[str, _Variant]:
    variants: dict[str, _Variant] = {"dense": (dense, None, False)}
    for name in args.implementations:
        if (name != "eager" or num_experts <= args.eager_max_experts) and (name != "grouped_mm" or grouped_mm_runs):
            variants[name] = (layer, name, False)
    variants[RECOMPUTE] = (layer, FAST_EXPERTS_IMPLEMENTATION, True)
    return variants


def _forward(config: MoEConfig, variant: _Variant, x: torch.Tensor) -> torch.Tensor:
    module, implementation, recompute = variant
    if implementation is not None:
        config._experts_implementation_internal = implementation
    config.expert_recompute_activations = recompute
    return module(x)


def _forward_backward(config: MoEConfig, variant: _Variant, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        _forward(config, variant, x).float().sum().backward()

    return run


def _cpu_layer_peaks(
    args: argparse.Namespace, num_experts: int, top_k: int, num_tokens: int, dtype: torch.dtype
) -> dict[str, int | None]:
    """Peak resident growth of each variant's forward+backward, in a new process (`_in_a_memory_process`) whose
    malloc is set for measuring (`cpu_malloc.malloc_for_measuring`): the growth is then the peak of the live memory,
    whereas in the timing process it would count freed memory malloc keeps, and miss what moe_fused's worker threads
    kept from earlier calls and reuse."""
    config, layer, dense, x, drop_grads = layer_and_dense(
        args, num_experts, top_k, num_tokens, torch.device("cpu"), dtype
    )
    variants = _layer_variants(args, num_experts, layer, dense)
    few_tokens = x[:8].detach().requires_grad_()
    return _resident_peaks(
        {name: _forward_backward(config, variant, x) for name, variant in variants.items()},
        [_forward_backward(config, variant, few_tokens) for variant in variants.values()],
        drop_grads,
    )


def _resident_peaks(
    steps: dict[str, Callable[[], None]], warm_ups: list[Callable[[], None]], reset: Callable[[], None]
) -> dict[str, int | None]:
    """`peak_resident_growth` of each step after `reset`, once every warm-up (the steps on a few tokens) has run, so
    that kernels' and libraries' one-time buffers are not counted."""
    for warm_up in warm_ups:
        warm_up()
    peaks = {}
    for name, step in steps.items():
        reset()
        peaks[name] = peak_resident_growth(step)
    return peaks


def _in_a_memory_process(measure: Callable[..., dict[str, int | None]], *args: object) -> dict[str, int | None]:
    """`measure(*args)` in a new process set for measuring memory (a module-level function: it is pickled by name);
    empty where this machine's memory cannot be measured (not Linux, or not glibc's malloc)."""
    if not can_measure_resident_growth():
        return {}
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_start_memory_process, initargs=(torch.get_num_threads(),)) as pool:
        return pool.apply(measure, args)


def _start_memory_process(num_threads: int) -> None:
    malloc_for_measuring()
    torch.set_num_threads(num_threads)  # as many as the timed runs had: moe_fused's worker threads depend on it


def _why_not_runnable(num_experts: int, top_k: int, num_tokens: int | None = None) -> str | None:
    """Why a sweep point cannot run, or None: k above the number of experts; with `num_tokens` (gemm mode), fewer
    rows `tokens * k` than experts."""
    if num_tokens is not None:
        return None if num_tokens * top_k >= num_experts else f"{num_tokens} tokens * k give no row per expert"
    return "k > experts" if top_k > num_experts else None


def _skipped(num_experts: int, top_k: int, num_tokens: int | None = None) -> bool:
    """Whether to skip a sweep point, saying why if so."""
    why = _why_not_runnable(num_experts, top_k, num_tokens)
    if why is not None:
        print(f"skipping experts={num_experts}, k={top_k}: {why}", flush=True)
    return why is not None


def run_layer_benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for num_experts in args.experts:
        for top_k in args.top_k:
            if _skipped(num_experts, top_k):
                continue
            for num_tokens in args.tokens:
                config, layer, dense, x, drop_grads = layer_and_dense(
                    args, num_experts, top_k, num_tokens, device, dtype
                )
                grouped_mm_runs = "grouped_mm" not in args.implementations or not _skip_grouped_mm(
                    num_experts, device, dtype
                )
                variants = _layer_variants(args, num_experts, layer, dense, grouped_mm_runs)
                steps = {name: _forward_backward(config, variant, x) for name, variant in variants.items()}
                times = _median_times(steps, args.repeats, device, reset=drop_grads)
                saved = {}
                for name, variant in variants.items():
                    drop_grads()
                    saved[name] = _saved_bytes(functools.partial(_forward, config, variant, x))
                drop_grads()
                if device.type == "cuda":
                    peaks = {name: _peak_cuda_bytes_added(step, device, drop_grads) for name, step in steps.items()}
                else:
                    peaks = _in_a_memory_process(_cpu_layer_peaks, args, num_experts, top_k, num_tokens, dtype)
                drop_grads()
                memory = {name: (saved[name], peaks.get(name)) for name in variants}
                recompute_time, recompute_memory = times.pop(RECOMPUTE), memory.pop(RECOMPUTE)
                fused = times[FAST_EXPERTS_IMPLEMENTATION]
                row = {
                    "experts": num_experts,
                    "k": top_k,
                    "tokens": num_tokens,
                    "times": times,
                    "memory": memory,
                    "recompute_time": recompute_time,
                    "recompute_memory": recompute_memory,
                    "fused_tokens_per_s": num_tokens / fused,
                    "dense_tokens_per_s": num_tokens / times["dense"],
                }
                rows.append(row)
                print(_layer_table([row], args, header=not rows[:-1]), flush=True)
                del layer, dense, x, drop_grads, variants, steps
                gc.collect()
    return rows


def _layer_table(rows: list[dict], args: argparse.Namespace, header: bool = True) -> str:
    mib = 2**20
    batched = "batched_mm" in args.implementations  # its two columns at the end, only when it was asked for
    lines = []
    if header:
        lines += [
            "| experts | k | tokens | moe_fused tok/s | dense tok/s | fused / dense | grouped_mm / dense | eager / dense "
            "| fused speed-up vs grouped_mm | vs eager | saved for bwd MiB (incl. weights): dense / fused / fused+recompute "
            "| recompute time / fused | peak MiB added by forward+backward: dense / fused / fused+recompute / grouped_mm |"
            + (" batched_mm / dense | fused speed-up vs batched_mm |" if batched else ""),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|" + ("---:|---:|" if batched else ""),
        ]
    for row in rows:
        t, mem = row["times"], row["memory"]
        fused, dense = t[FAST_EXPERTS_IMPLEMENTATION], t["dense"]
        grouped, eager = t.get("grouped_mm"), t.get("eager")
        saved = f"{mem['dense'][0] / mib:.1f} / {mem[FAST_EXPERTS_IMPLEMENTATION][0] / mib:.1f} / "
        saved += f"{row['recompute_memory'][0] / mib:.1f}"
        peaks = (
            mem["dense"][1],
            mem[FAST_EXPERTS_IMPLEMENTATION][1],
            row["recompute_memory"][1],
            mem.get("grouped_mm", (None, None))[1],
        )
        peak = "-" if peaks[0] is None else " / ".join(_mib(p) for p in peaks)
        lines.append(
            f"| {row['experts']} | {row['k']} | {row['tokens']} | {row['fused_tokens_per_s']:.0f} "
            f"| {row['dense_tokens_per_s']:.0f} | {fused / dense:.2f} "
            f"| {_fmt(grouped / dense if grouped else None)} | {_fmt(eager / dense if eager else None)} "
            f"| {_fmt(grouped / fused if grouped else None)} | {_fmt(eager / fused if eager else None)} "
            f"| {saved} | {row['recompute_time'] / fused:.2f} | {peak} |"
        )
        if batched:
            other = t.get("batched_mm")
            lines[-1] += f" {_fmt(other / dense if other else None)} | {_fmt(other / fused if other else None)} |"
    return "\n".join(lines)


def run_gemm_benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """SPEC §6's shrinking batch in isolation: the expert up-projections of `tokens * k` rows spread evenly over the
    experts, as one `mm` per expert, one `bmm`, one `grouped_mm`, both of the first two also shared out over worker
    threads (CPU), and, for the dense rate, one `mm` of all rows by a single weight. Every variant does the same
    FLOPs."""
    rows = []
    for num_experts, top_k, num_tokens in itertools.product(args.experts, args.top_k, args.tokens):
        if _skipped(num_experts, top_k, num_tokens):
            continue
        per_expert = num_tokens * top_k // num_experts
        total = per_expert * num_experts
        torch.manual_seed(0)
        x = torch.randn(total, args.hidden, device=device, dtype=dtype)  # (experts * rows, hidden)
        # (experts, hidden, expert hidden): nn.Linear's (out, in) storage seen transposed, as the experts use it
        weight_t = torch.randn(num_experts, args.expert_hidden, args.hidden, device=device, dtype=dtype).mT
        out = torch.empty(total, args.expert_hidden, device=device, dtype=dtype)
        offsets = torch.arange(1, num_experts + 1, device=device, dtype=torch.int32) * per_expert

        def per_expert_mm(
            first: int,
            end: int,
            x: torch.Tensor = x,
            weight_t: torch.Tensor = weight_t,
            out: torch.Tensor = out,
            n: int = per_expert,
        ) -> None:
            for e in range(first, end):
                torch.mm(x[e * n : (e + 1) * n], weight_t[e], out=out[e * n : (e + 1) * n])

        def bmm(
            first: int,
            end: int,
            x: torch.Tensor = x,
            weight_t: torch.Tensor = weight_t,
            out: torch.Tensor = out,
            n: int = per_expert,
        ) -> None:
            torch.bmm(
                x[first * n : end * n].view(end - first, n, -1),
                weight_t[first:end],
                out=out[first * n : end * n].view(end - first, n, -1),
            )

        variants = {
            "one mm": lambda x=x, w=weight_t[0], out=out: torch.mm(x, w, out=out),
            "mm per expert": lambda run=per_expert_mm, end=num_experts: run(0, end),
            "bmm": lambda run=bmm, end=num_experts: run(0, end),
        }
        workers = min(worker_thread_count(top_k), num_experts)
        if device.type == "cpu" and workers > 1:  # as moe_fused runs its blocks on a CPU
            variants[MM_IN_WORKERS] = _in_worker_threads(per_expert_mm, num_experts, workers)
            variants[BMM_IN_WORKERS] = _in_worker_threads(bmm, num_experts, workers)
        if hasattr(nn.functional, "grouped_mm") and not _skip_grouped_mm(num_experts, device, dtype):
            variants["grouped_mm"] = lambda x=x, w=weight_t, offs=offsets: nn.functional.grouped_mm(x, w, offs=offs)
        times = _median_times(variants, args.repeats, device)
        flops = 2 * total * args.hidden * args.expert_hidden
        row = {
            "experts": num_experts,
            "k": top_k,
            "tokens": num_tokens,
            "rows_per_expert": per_expert,
            "gflops": {name: flops / t / 1e9 for name, t in times.items()},
        }
        rows.append(row)
        print(_gemm_table([row], header=len(rows) == 1), flush=True)
        del x, weight_t, out, variants
        gc.collect()
    return rows


def _in_worker_threads(run: Callable[[int, int], None], num_experts: int, workers: int) -> Callable[[], None]:
    """`run(first, end)` over `workers` contiguous runs of experts, each in a worker thread with an even share of the
    caller's intra-op threads: how `moe_fused` shares out its blocks on a CPU (`fast_experts.map_in_worker_threads`)."""
    bounds = [num_experts * i // workers for i in range(workers + 1)]
    return lambda: map_in_worker_threads(lambda i: run(bounds[i], bounds[i + 1]), list(range(workers)))


def _gemm_table(rows: list[dict], header: bool = True) -> str:
    names = ["one mm", "mm per expert", MM_IN_WORKERS, "bmm", BMM_IN_WORKERS, "grouped_mm"]
    lines = []
    if header:
        lines.append(
            "| experts | k | tokens | rows per expert | "
            + " | ".join(f"{name} GFLOP/s" for name in names)
            + " | mm per expert / one mm (time) |"
        )
        lines.append("|" + "---:|" * (5 + len(names)))
    for row in rows:
        rates = row["gflops"]
        # two significant digits below 0.1 (tiny --quick sizes, where thread start-up dominates): never a bare 0.0
        cells = [_fmt(rates.get(name), ".1f" if rates.get(name, 1.0) >= 0.1 else ".2g") for name in names]
        slowdown = rates["one mm"] / rates["mm per expert"]
        lines.append(
            f"| {row['experts']} | {row['k']} | {row['tokens']} | {row['rows_per_expert']} | "
            + " | ".join(cells)
            + f" | {slowdown:.2f} |"
        )
    return "\n".join(lines)


def _olmoe_and_moe(args: argparse.Namespace, num_experts: int, top_k: int) -> tuple[MoEForCausalLM, nn.Module]:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    common = {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads,
        "max_position_embeddings": args.seq_len + args.new_tokens + 8,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
    }
    torch.manual_seed(0)
    olmoe = OlmoeForCausalLM(
        OlmoeConfig(
            **common,
            intermediate_size=args.expert_hidden,
            norm_topk_prob=True,
            router_aux_loss_coef=0.01,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    )
    olmoe.config.output_router_logits = True  # its load-balancing loss, as ours is always on in training
    ours = MoEForCausalLM(
        MoEConfig(**common, expert_intermediate_size=args.expert_hidden, expert_activation=args.activation)
    )
    return ours, olmoe


# The model mode's reference: transformers' own MoE model with its grouped experts.
OLMOE_REFERENCE = "OlmoeForCausalLM (grouped_mm)"


def _model_variants(
    ours: nn.Module, olmoe: nn.Module, grouped_mm_runs: bool = True
) -> dict[str, tuple[nn.Module, str]]:
    """(model, experts implementation) per variant; OLMoE with our fused path shows what the rest costs."""
    variants = {
        f"MoEForCausalLM ({FAST_EXPERTS_IMPLEMENTATION})": (ours, FAST_EXPERTS_IMPLEMENTATION),
        "MoEForCausalLM (grouped_mm)": (ours, "grouped_mm"),
        OLMOE_REFERENCE: (olmoe, "grouped_mm"),
        f"OlmoeForCausalLM ({FAST_EXPERTS_IMPLEMENTATION})": (olmoe, FAST_EXPERTS_IMPLEMENTATION),
    }
    return {name: v for name, v in variants.items() if grouped_mm_runs or v[1] != "grouped_mm"}


def _train_step(model: nn.Module, implementation: str, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.set_experts_implementation(implementation)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()

    return run


def _models_and_batch(
    args: argparse.Namespace, num_experts: int, top_k: int, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(ours, OLMoE, training batch `(batch, seq_len)`), seeded: the same in the memory process."""
    ours, olmoe = _olmoe_and_moe(args, num_experts, top_k)
    for model in (ours, olmoe):
        model.to(device=device, dtype=dtype)
    return ours, olmoe, torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)


def _cpu_model_peaks(
    args: argparse.Namespace, num_experts: int, top_k: int, dtype: torch.dtype
) -> dict[str, int | None]:
    """Peak resident growth of each variant's training step (forward+backward), as `_cpu_layer_peaks` does for the
    layer."""
    ours, olmoe, ids = _models_and_batch(args, num_experts, top_k, torch.device("cpu"), dtype)
    variants = _model_variants(ours, olmoe)

    def drop_grads() -> None:
        ours.zero_grad(set_to_none=True)
        olmoe.zero_grad(set_to_none=True)

    return _resident_peaks(
        {name: _train_step(model, implementation, ids) for name, (model, implementation) in variants.items()},
        [_train_step(model, implementation, ids[:1, :8]) for model, implementation in variants.values()],
        drop_grads,
    )


def run_model_benchmark(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for num_experts in args.experts:
        for top_k in args.top_k:
            if _skipped(num_experts, top_k):
                continue
            ours, olmoe, ids = _models_and_batch(args, num_experts, top_k, device, dtype)
            variants = _model_variants(ours, olmoe, not _skip_grouped_mm(num_experts, device, dtype))
            prompt = ids[:, : max(1, args.seq_len // 4)]

            def generate(model: nn.Module, implementation: str, prompt: torch.Tensor = prompt) -> Callable[[], None]:
                def run() -> None:
                    model.set_experts_implementation(implementation)
                    model.eval()
                    with torch.no_grad():
                        model.generate(
                            prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
                        )

                return run

            def drop_grads(models: tuple[nn.Module, ...] = (ours, olmoe)) -> None:
                for model in models:
                    model.zero_grad(set_to_none=True)

            # The rate of one large matmul, timed among the steps: the ceiling of a step's GFLOP/s on this machine.
            mm_shape = (ids.numel(), args.hidden, top_k * args.expert_hidden)
            mm_a = torch.randn(mm_shape[:2], device=device, dtype=dtype)
            mm_b = torch.randn(mm_shape[1:], device=device, dtype=dtype)
            steps = {name: _train_step(model, impl, ids) for name, (model, impl) in variants.items()}
            steps[ONE_MM] = lambda a=mm_a, b=mm_b: torch.mm(a, b)
            train = _median_times(steps, args.repeats, device, reset=drop_grads)
            mm_rate = 2 * math.prod(mm_shape) / train[ONE_MM]
            flops = {}  # counted on an untimed step of each variant
            for name, (model, implementation) in variants.items():
                model.set_experts_implementation(implementation)
                flops[name] = training_step_flops(model.train(), ids)
            drop_grads()
            if device.type == "cuda":
                peaks = {name: _peak_cuda_bytes_added(steps[name], device, drop_grads) for name in variants}
            else:
                peaks = _in_a_memory_process(_cpu_model_peaks, args, num_experts, top_k, dtype)
            drop_grads()
            gen = _median_times({n: generate(*v) for n, v in variants.items()}, args.repeats, device)
            reference = OLMOE_REFERENCE if OLMOE_REFERENCE in variants else None
            for name in variants:
                rows.append(
                    {
                        "model": name,
                        "experts": num_experts,
                        "k": top_k,
                        "train_tokens_per_s": args.batch * args.seq_len / train[name],
                        "train_gflop_per_step": flops[name] / 1e9,
                        "train_gflops": flops[name] / train[name] / 1e9,
                        "train_share_of_mm": flops[name] / train[name] / mm_rate,
                        "one_mm_shape": mm_shape,
                        "one_mm_gflops": mm_rate / 1e9,
                        "train_peak_bytes_added": peaks.get(name),
                        "generate_tokens_per_s": args.batch * args.new_tokens / gen[name],
                        "train_vs_olmoe": train[reference] / train[name] if reference else None,
                        "generate_vs_olmoe": gen[reference] / gen[name] if reference else None,
                    }
                )
            print(_model_table(rows[-len(variants) :], header=len(rows) == len(variants)), flush=True)
            del ours, olmoe, variants, steps
            gc.collect()
    return rows


def _model_table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += [
            "| model (experts implementation) | experts | k | training tok/s | vs OLMoE (grouped_mm) "
            "| training GFLOP/step | training GFLOP/s | one mm GFLOP/s | training / one mm "
            "| training step peak MiB added | greedy generation tok/s | vs OLMoE (grouped_mm) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['experts']} | {row['k']} | {row['train_tokens_per_s']:.0f} "
            f"| {_fmt(row['train_vs_olmoe'])} | {row['train_gflop_per_step']:.4g} | {row['train_gflops']:.1f} "
            f"| {row['one_mm_gflops']:.1f} | {row['train_share_of_mm']:.2f} "
            f"| {_mib(row['train_peak_bytes_added'])} "
            f"| {row['generate_tokens_per_s']:.1f} | {_fmt(row['generate_vs_olmoe'])} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (top_k, tokens), group in _groups(rows).items():
        experts = [r["experts"] for r in group]
        for name, style in ((FAST_EXPERTS_IMPLEMENTATION, "o-"), ("grouped_mm", "s--"), ("eager", "^:")):
            points = [(e, tokens / r["times"][name]) for e, r in zip(experts, group, strict=True) if name in r["times"]]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{name} k={top_k} T={tokens}")
        ax.plot(experts, [r["dense_tokens_per_s"] for r in group], "k-", alpha=0.4, label=f"dense k={top_k} T={tokens}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of experts")
    ax.set_ylabel("tokens/s (forward + backward)")
    ax.set_title("MoE layer vs dense FFN with the same active parameters")
    ax.legend(fontsize=6)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _groups(rows: list[dict]) -> dict[tuple[int, int], list[dict]]:
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["k"], row["tokens"]), []).append(row)
    return groups


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """`parser.error` for an option below 1: a number, or any value of a list option."""
    for name in names:
        value = getattr(args, name)
        if isinstance(value, list):
            bad = [v for v in value if v < 1]
            if bad:
                parser.error(f"--{name.replace('_', '-')} values must be positive, got {bad}")
        elif value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")


def add_layer_script_arguments(parser: argparse.ArgumentParser, experts: list[int], output: str) -> None:
    """The options of the single-question layer benchmarks in `scripts/`: one layer shape, a list of expert counts."""
    parser.add_argument("--experts", type=int, nargs="+", default=experts)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path(output))


def print_and_write_table(heading: list[str], rows: Iterable[str], output: Path) -> str:
    """Print a table's `heading`, then each of its `rows` as it is measured (a long sweep shows its progress), then
    write the whole table to `output` (atomically); returns the table's text. For the layer scripts in `scripts/`."""
    lines = list(heading)
    print("\n".join(lines), flush=True)
    for row in rows:
        lines.append(row)
        print(row, flush=True)
    text = "\n".join(lines) + "\n"
    write_atomically(output, text)
    return text


def parse_layer_script_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `add_layer_script_arguments`' options, every count checked to be positive."""
    args = parser.parse_args(argv)
    check_positive(parser, args, ("top_k", "tokens", "hidden", "expert_hidden", "repeats", "experts"))
    return args


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {allocator_name()}"


# `--quick`: a smoke run (under a minute on 2 CPU cores, mostly starting the peak-memory processes).
QUICK_VALUES = dict(
    experts=[4, 16],
    top_k=[2],
    tokens=[64],
    repeats=2,
    hidden=32,
    expert_hidden=64,
    layers=1,
    heads=4,
    vocab=128,
    batch=2,
    seq_len=16,
    new_tokens=4,
)


def _runnable_combinations(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    gemm = args.mode == "gemm"  # layer and model modes: k <= experts whatever the tokens
    return [
        (experts, k, tokens)
        for experts, k, tokens in itertools.product(args.experts, args.top_k, args.tokens)
        if _why_not_runnable(experts, k, tokens if gemm else None) is None
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moe-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("layer", "model", "both", "gemm"), default="layer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="default: bfloat16 on CUDA (the GPU question: bf16 MoE layer against the dense FFN and grouped_mm), "
        "float32 elsewhere",
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--top-k", type=int, nargs="+", default=[4])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per layer call (layer mode)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--activation", choices=("relu", "swiglu"), default=None, help="relu (layer) / swiglu (model)")
    parser.add_argument("--implementations", nargs="+", default=list(LAYER_IMPLEMENTATIONS))
    parser.add_argument("--eager-max-experts", type=int, default=256, help="skip the (slow) eager path above this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2, help="model mode: decoder layers")
    parser.add_argument("--heads", type=int, default=8, help="model mode: attention heads")
    parser.add_argument("--vocab", type=int, default=8192, help="model mode: vocabulary size")
    parser.add_argument("--batch", type=int, default=8, help="model mode: sequences per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="model mode: training sequence length")
    parser.add_argument("--new-tokens", type=int, default=32, help="model mode: greedy tokens generated")
    parser.add_argument("--output-dir", type=Path, default=Path("benchmark_results"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and 2 repeats for every option not given: a smoke run (under a minute on 2 CPU cores)",
    )
    args = parser.parse_args(argv)
    if args.quick:  # quick sizes as the defaults: the options given on the command line keep their values
        parser.set_defaults(**QUICK_VALUES)
        args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.split(":")[0] == "cuda" else "float32"
    counts = ["experts", "top_k", "tokens", "hidden", "expert_hidden", "repeats"]
    check_positive(parser, args, [*counts, "layers", "heads", "vocab", "batch", "seq_len", "new_tokens"])
    if args.mode in ("model", "both"):
        if args.hidden % args.heads != 0 or (args.hidden // args.heads) % 2 != 0:
            parser.error(
                f"--hidden ({args.hidden}) must be divisible by --heads ({args.heads}) into an even head size (RoPE)"
            )
    if not _runnable_combinations(args):
        what = (
            "--experts, --top-k and --tokens (tokens * k >= experts)"
            if args.mode == "gemm"
            else "--experts and --top-k (k <= experts)"
        )
        parser.error(
            f"no runnable combination of {what}: experts {args.experts}, top-k {args.top_k}, tokens {args.tokens}"
        )
    unknown = [name for name in args.implementations if name not in LAYER_IMPLEMENTATIONS + ("batched_mm",)]
    if unknown or FAST_EXPERTS_IMPLEMENTATION not in args.implementations:
        parser.error(
            f"--implementations must include {FAST_EXPERTS_IMPLEMENTATION!r} and be among "
            f"{LAYER_IMPLEMENTATIONS + ('batched_mm',)}, got {args.implementations}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise SystemExit(
            f"--device {args.device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {error}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine.")
    dtype = DTYPES[args.dtype]
    check_output_dir(args.output_dir)
    machine = _machine(device)
    print(f"# moe-bench on {machine}, {args.dtype}", flush=True)
    if args.mode in ("layer", "both"):
        layer_args = argparse.Namespace(**vars(args))
        layer_args.activation = args.activation or "relu"
        rows = run_layer_benchmark(layer_args, device, dtype)
        text = (
            f"MoE layer forward+backward, {machine}, {args.dtype}, hidden {args.hidden}, expert hidden "
            f"{args.expert_hidden}, {layer_args.activation} experts, median of {args.repeats} repeats "
            "(variants interleaved, shuffled).\n\n"
            f"{_layer_table(rows, layer_args)}\n"
        )
        write_atomically(args.output_dir / "benchmark_layer.md", text)
        _plot(rows, args.output_dir / "benchmark_layer.png")
    if args.mode in ("model", "both"):
        model_args = argparse.Namespace(**vars(args))
        model_args.activation = args.activation or "swiglu"
        rows = run_model_benchmark(model_args, device, dtype)
        text = (
            f"Whole model, {machine}, {args.dtype}: {args.layers} layers, hidden {args.hidden}, expert hidden "
            f"{args.expert_hidden}, {model_args.activation} experts, vocab {args.vocab}; training on "
            f"{args.batch}x{args.seq_len} tokens, greedy generation of {args.new_tokens} tokens for {args.batch} "
            f"prompts; median of {args.repeats} repeats (variants interleaved, shuffled). Training GFLOP: matmul "
            "FLOPs counted with torch's FlopCounterMode; one mm: (batch * seq_len, hidden) @ (hidden, k * expert "
            f"hidden), timed among the steps.\n\n{_model_table(rows)}\n"
        )
        write_atomically(args.output_dir / "benchmark_model.md", text)
    if args.mode == "gemm":
        rows = run_gemm_benchmark(args, device, dtype)
        text = (
            f"Expert up-projection matmuls, {machine}, {args.dtype}: (rows, {args.hidden}) @ ({args.hidden}, "
            f"{args.expert_hidden}) per expert, `tokens * k` rows spread evenly over the experts; median of "
            f"{args.repeats} repeats (variants interleaved, shuffled).\n\n{_gemm_table(rows)}\n"
        )
        write_atomically(args.output_dir / "benchmark_gemm.md", text)
    print(f"wrote {args.output_dir}", flush=True)


if __name__ == "__main__":
    main()
