"""Shared helpers: tiny models that build and run in milliseconds on a CPU."""

import os

import torch

from modeling_moe import MoEConfig

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_config(**overrides) -> MoEConfig:
    settings = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=6,
        num_experts_per_tok=2,
        expert_intermediate_size=24,
        moe_layers=[1],
        max_position_embeddings=128,
        pad_token_id=0,
    )
    settings.update(overrides)
    return MoEConfig(**settings)
