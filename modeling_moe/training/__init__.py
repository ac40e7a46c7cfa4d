"""Reusable training pieces of the CLIs: data, expert-balance callback, evaluation metrics and Hub export."""

from .callbacks import ExpertBalanceCallback, add_expert_balance_callback, plot_expert_load_heatmap, unwrap_moe_model
from .data import default_corpus, load_raw_datasets, tokenize_and_pack, train_bpe_tokenizer
from .evaluation import build_compute_metrics, parameter_counts, preprocess_logits_for_metrics
from .hub import render_model_card, write_hub_folder

__all__ = [
    "ExpertBalanceCallback",
    "add_expert_balance_callback",
    "build_compute_metrics",
    "default_corpus",
    "load_raw_datasets",
    "parameter_counts",
    "plot_expert_load_heatmap",
    "preprocess_logits_for_metrics",
    "render_model_card",
    "tokenize_and_pack",
    "train_bpe_tokenizer",
    "unwrap_moe_model",
    "write_hub_folder",
]
