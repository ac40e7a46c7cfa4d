#!/usr/bin/env python
"""Whole-model training step time of MoEForCausalLM with the fused experts path vs transformers' `grouped_mm`.

Prints a markdown table: 2 decoder layers, hidden 512, 8 heads, vocabulary 8192, every layer MoE with k=4 and experts
of hidden 1024, a batch of 8 x 256 tokens, forward + backward, median of 3 timed steps after one warm-up step.
"""

import time

import torch

from modeling_moe import MoEConfig, MoEForCausalLM


def median_step_seconds(model: MoEForCausalLM, input_ids: torch.Tensor, repeats: int = 3) -> float:
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def main() -> None:
    torch.manual_seed(0)
    input_ids = torch.randint(0, 8192, (8, 256))
    print("| experts | expert type | `moe_fused` s/step | `grouped_mm` s/step |")
    print("|---:|---|---:|---:|")
    for num_experts in (64, 256):
        for activation in ("relu", "swiglu"):
            config = MoEConfig(
                vocab_size=8192,
                hidden_size=512,
                num_hidden_layers=2,
                num_attention_heads=8,
                num_experts=num_experts,
                num_experts_per_tok=4,
                expert_intermediate_size=1024,
                expert_activation=activation,
            )
            seconds = {
                name: median_step_seconds(MoEForCausalLM._from_config(config, experts_implementation=name), input_ids)
                for name in ("moe_fused", "grouped_mm")
            }
            label = "ReLU" if activation == "relu" else "SwiGLU"
            print(f"| {num_experts} | {label} | {seconds['moe_fused']:.3f} | {seconds['grouped_mm']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
