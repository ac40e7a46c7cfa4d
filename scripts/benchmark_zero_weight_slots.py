"""What skipping zero-weight slots buys (SPEC §1: only experts with G(x)_i != 0 are computed): a MoE layer with the
balanced router (whose unused slots have weight 0) and with the noisy top-k router under an expert capacity (whose
assignments over capacity have weight 0), forward + backward with `moe_fused`, its zero-weight slots skipped (the
default) or computed (as before), interleaved and shuffled in one process. Prints a Markdown table and writes it to
`--output`.

    python scripts/benchmark_zero_weight_slots.py --experts 64 --top-k 4 --tokens 4096 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch

from modeling_moe import MoEConfig, fast_experts
from modeling_moe import modeling_moe as modeling
from modeling_moe.cli.benchmark import (
    _machine,
    _median_times,
    add_layer_script_arguments,
    parse_layer_script_arguments,
    print_and_write_table,
)

SKIPPED, COMPUTED = "skipped", "computed"
ROUTERS = {
    "balanced": dict(router_type="balanced"),
    "noisy_top_k, capacity 0.5": dict(router_type="noisy_top_k", expert_capacity_factor=0.5),
}


@contextlib.contextmanager
def zero_weight_slots_computed() -> Iterator[None]:
    """The MoE block as before the skip: zero-weight slots keep their expert id, so the experts compute them."""
    skipping = modeling._SKIPS_SENTINEL_IDS
    modeling._SKIPS_SENTINEL_IDS = ()
    try:
        yield
    finally:
        modeling._SKIPS_SENTINEL_IDS = skipping


def build_block(router: str, num_experts: int, args: argparse.Namespace) -> modeling.MoESparseBlock:
    config = MoEConfig(
        hidden_size=args.hidden,
        num_attention_heads=2,
        num_experts=num_experts,
        num_experts_per_tok=args.top_k,
        expert_intermediate_size=args.expert_hidden,
        **ROUTERS[router],
    )
    config._experts_implementation_internal = fast_experts.FAST_EXPERTS_IMPLEMENTATION
    torch.manual_seed(0)
    block = modeling.MoESparseBlock(config).train()
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name != "gate.threshold":
                param.normal_(0, 0.02)  # gates too: routing that depends on the token
    return block


def time_block(router: str, num_experts: int, args: argparse.Namespace) -> tuple[dict[str, float], int, int]:
    """(median times, slots handed to the experts, slots with a nonzero weight)."""
    block = build_block(router, num_experts, args)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    slots = {}
    hook = block.experts.register_forward_pre_hook(lambda module, inputs: slots.update(weights=inputs[2]))
    with torch.no_grad():
        block(x)
    hook.remove()

    def drop_grads() -> None:
        for param in block.parameters():
            param.grad = None

    def step(context: contextlib.AbstractContextManager) -> None:
        with context:
            output, router_output = block(x)
            (output.square().mean() + router_output.importance_loss + router_output.load_loss).backward()

    variants = {
        SKIPPED: lambda: step(contextlib.nullcontext()),
        COMPUTED: lambda: step(zero_weight_slots_computed()),
    }
    times = _median_times(variants, args.repeats, torch.device("cpu"), reset=drop_grads)
    drop_grads()
    weights = slots["weights"]
    return times, weights.numel(), int((weights != 0).sum())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_script_arguments(parser, experts=[64], output="benchmark_results/zero_weight_slots.md")
    args = parse_layer_script_arguments(parser, argv)
    if args.hidden % 4:
        parser.error(f"--hidden must be a multiple of 4 (two attention heads of an even size), got {args.hidden}")
    if any(args.top_k > n for n in args.experts):
        parser.error(f"--top-k ({args.top_k}) must be at most every --experts value, got {args.experts}")
    heading = [
        f"MoE layer forward+backward (moe_fused), {_machine(torch.device('cpu'))}, {torch.get_num_threads()} intra-op "
        f"threads, float32, {args.tokens} tokens, k={args.top_k}, hidden {args.hidden}, expert hidden "
        f"{args.expert_hidden}; median of {args.repeats} repeats (variants interleaved, shuffled).",
        "",
        f"| router | experts | slots | nonzero-weight slots | {COMPUTED} s | {SKIPPED} s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def rows() -> Iterator[str]:
        for num_experts in args.experts:
            for router in ROUTERS:
                times, num_slots, nonzero = time_block(router, num_experts, args)
                yield (
                    f"| {router} | {num_experts} | {num_slots} | {nonzero} | {times[COMPUTED]:.3f} "
                    f"| {times[SKIPPED]:.3f} | {times[COMPUTED] / times[SKIPPED]:.2f} |"
                )

    return print_and_write_table(heading, rows(), args.output)


if __name__ == "__main__":
    main()
