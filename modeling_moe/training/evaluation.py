"""Evaluation pieces shared by `moe-train` and `moe-eval`: perplexity and next-token accuracy through `evaluate`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from .callbacks import ExpertBalanceCallback, add_expert_balance_callback
from .label_smoothing import smooth_labels_in_the_model

if TYPE_CHECKING:
    import evaluate
    from transformers import PreTrainedTokenizerBase

    from ..configuration_moe import MoEConfig

ACCURACY_METRIC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "metrics", "accuracy")


def load_accuracy_metric() -> evaluate.EvaluationModule:
    """`evaluate`'s accuracy: the module shipped in this package (loads offline), the Hub one as a fallback."""
    import evaluate

    try:
        return evaluate.load(ACCURACY_METRIC_PATH)
    except Exception:  # noqa: BLE001 -- a broken install: try the Hub's copy of the same metric
        return evaluate.load("accuracy")


def preprocess_logits_for_metrics(
    logits: torch.Tensor | tuple, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce `(batch, seq, vocab)` logits to what the metrics need, before Trainer gathers them.

    Returns the argmax prediction and the negative log-likelihood of the label for every position that predicts the
    next token (shifted like the model's loss), `(batch, seq - 1)` each.
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    predictions = shifted.argmax(dim=-1)
    log_probs = torch.log_softmax(shifted, dim=-1)
    nll = -log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return predictions, nll


def build_compute_metrics() -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` for the Trainer: `perplexity = exp(mean next-token NLL)` and `accuracy` (via `evaluate`).

    Both ignore label `-100`. Perplexity is of the language-modelling loss alone, without the balancing losses.
    """
    metric = load_accuracy_metric()

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        predictions, nll = eval_prediction.predictions
        labels = np.asarray(eval_prediction.label_ids)[:, 1:]
        mask = labels != -100
        predictions = np.asarray(predictions)[mask].astype(np.int64)
        references = labels[mask].astype(np.int64)
        mean_nll = float(np.asarray(nll, dtype=np.float64)[mask].mean()) if mask.any() else float("nan")
        accuracy = metric.compute(predictions=predictions, references=references)["accuracy"]
        return {"perplexity": math.exp(mean_nll), "accuracy": float(accuracy), "nll": mean_nll}

    return compute_metrics


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters and parameters active per token (dense part + k of the n experts of each MoE layer)."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    expert_params = 0
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            expert_params += p.numel()
    k, n = config.experts_per_token, config.num_experts
    active = total - expert_params + expert_params * k // n
    return {"total_parameters": int(total), "active_parameters": int(active)}


def balance_summary(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, float]:
    """Mean over MoE layers of CV(Importance), CV(Load), max/mean load from per-layer metrics."""
    out = {}
    for stat in ("cv_importance", "cv_load", "max_mean_load"):
        values = [v for k, v in metrics.items() if k.startswith(f"{prefix}layer_") and k.endswith(f"/{stat}")]
        if values:
            out[stat] = float(sum(values) / len(values))
    return out


def format_table(rows: list[tuple[str, Any]]) -> str:
    """A two-column Markdown table (what the CLIs print and the README shows)."""
    lines = ["| metric | value |", "|---|---|"]
    for name, value in rows:
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
        elif isinstance(value, int):
            value = f"{value:,}"
        lines.append(f"| {name} | {value} |")
    return "\n".join(lines)


def summary_rows(metrics: dict[str, Any], config: MoEConfig, counts: dict[str, int]) -> list[tuple[str, Any]]:
    """The rows of the run summary table from evaluation metrics, the config and the parameter counts."""
    rows: list[tuple[str, Any]] = [
        ("experts per MoE layer (n)", config.num_experts),
        ("experts per token (k)", config.experts_per_token),
        ("MoE layers", len(getattr(config, "moe_layer_indices", []) or [])),
        ("total parameters", counts["total_parameters"]),
        ("active parameters per token", counts["active_parameters"]),
    ]
    if "train_loss" in metrics:
        rows.append(("train loss (LM + balancing)", float(metrics["train_loss"])))
    for key, label in (
        ("eval_nll", "validation LM loss (nats/token)"),
        ("eval_perplexity", "validation perplexity"),
        ("eval_accuracy", "validation next-token accuracy"),
    ):
        if key in metrics:
            rows.append((label, float(metrics[key])))
    for stat, label in balance_summary(metrics).items():
        rows.append(
            (
                {"cv_importance": "CV(Importance)", "cv_load": "CV(Load)", "max_mean_load": "max/mean load"}[stat]
                + " (validation, mean over layers)",
                label,
            )
        )
    return rows


def build_trainer(
    model: torch.nn.Module, args: TrainingArguments, tokenizer: PreTrainedTokenizerBase, **trainer_kwargs: Any
) -> tuple[Trainer, ExpertBalanceCallback]:
    """The `Trainer` of `moe-train` and `moe-eval`: perplexity/accuracy metrics and the expert-balance callback.

    Trainer.evaluate gathers only the logits: the model config's `keys_to_ignore_at_inference` lists every other output
    (router outputs, balancing losses). A `label_smoothing_factor` smooths the model's LM loss, so the balancing losses
    stay in the loss.
    """
    trainer = Trainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        compute_metrics=build_compute_metrics(),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        **trainer_kwargs,
    )
    smooth_labels_in_the_model(trainer)
    return trainer, add_expert_balance_callback(trainer)
