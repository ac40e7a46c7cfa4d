"""What `moe_fused`'s worker threads buy on a CPU: the MoE layer of `moe-bench` (softmax top-k gate + ReLU experts,
forward + backward) with its blocks shared out to worker threads (the default) and as one group on all intra-op
threads (as before the workers), against the dense FFN with the same active parameters, interleaved and shuffled in one
process. Prints a Markdown table and writes it to `--output`.

    python scripts/benchmark_worker_threads.py --experts 64 256 1024 --tokens 4096 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch

from modeling_moe import fast_experts
from modeling_moe.cli.benchmark import (
    _machine,
    _median_times,
    add_layer_script_arguments,
    layer_and_dense,
    parse_layer_script_arguments,
    print_and_write_table,
)

ONE_GROUP, WORKERS = "one group", "worker threads"


@contextlib.contextmanager
def one_group() -> Iterator[None]:
    """`moe_fused` without its worker threads: every block in one group, run on the caller's intra-op threads."""
    block_groups = fast_experts._SortedRouting.block_groups
    fast_experts._SortedRouting.block_groups = lambda self, parts: [self.blocks]
    try:
        yield
    finally:
        fast_experts._SortedRouting.block_groups = block_groups


def time_layer(num_experts: int, args: argparse.Namespace) -> dict[str, float]:
    cpu = torch.device("cpu")
    config, layer, dense, x, drop_grads = layer_and_dense(
        args, num_experts, args.top_k, args.tokens, cpu, torch.float32
    )
    config._experts_implementation_internal = fast_experts.FAST_EXPERTS_IMPLEMENTATION

    def step(module: torch.nn.Module, context: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], None]:
        def run() -> None:
            with context():
                module(x).sum().backward()

        return run

    variants = {
        "dense": step(dense, contextlib.nullcontext),
        ONE_GROUP: step(layer, one_group),
        WORKERS: step(layer, contextlib.nullcontext),
    }
    times = _median_times(variants, args.repeats, cpu, reset=drop_grads)
    drop_grads()
    return times


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_script_arguments(parser, experts=[64, 256, 1024], output="benchmark_results/worker_threads.md")
    args = parse_layer_script_arguments(parser, argv)
    args.activation = "relu"
    heading = [
        f"MoE layer forward+backward, {_machine(torch.device('cpu'))}, {torch.get_num_threads()} intra-op threads, "
        f"float32, {args.tokens} tokens, k={args.top_k}, hidden {args.hidden}, expert hidden {args.expert_hidden}; "
        f"median of {args.repeats} repeats (variants interleaved, shuffled).",
        "",
        f"| experts | rows per expert | {ONE_GROUP} / dense | {WORKERS} / dense | speed-up of the {WORKERS} |",
        "|---:|---:|---:|---:|---:|",
    ]

    def rows() -> Iterator[str]:
        for num_experts in args.experts:
            times = time_layer(num_experts, args)
            yield (
                f"| {num_experts} | {args.tokens * args.top_k // num_experts} "
                f"| {times[ONE_GROUP] / times['dense']:.2f} | {times[WORKERS] / times['dense']:.2f} "
                f"| {times[ONE_GROUP] / times[WORKERS]:.2f} |"
            )

    return print_and_write_table(heading, rows(), args.output)


if __name__ == "__main__":
    main()
