"""`--label_smoothing_factor` without losing the balancing losses.

With a label smoothing factor, Trainer takes the labels away from the model and computes the loss from the logits
alone, so the importance and load losses (SPEC §3) would silently drop out of training (as OLMoE's aux loss does under
Trainer). Here the labels stay with the model, whose loss function smooths them: the model's loss is then the
label-smoothed LM loss plus its balancing losses, weighted as usual.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Trainer

from .callbacks import unwrap_moe_model


def label_smoothed_causal_lm_loss(epsilon: float):
    """`ForCausalLMLoss` with label smoothing: `(1 - epsilon) * NLL + epsilon * mean over the vocabulary of -log p`.

    The value of transformers' `LabelSmoother(epsilon)(outputs, labels, shift_labels=True, num_items_in_batch=...)`.
    """

    def loss_function(
        logits: torch.Tensor,  # (batch, seq, vocab)
        labels: torch.Tensor,  # (batch, seq)
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if shift_labels is None:  # tokens < t predict t
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        logits = logits.float().reshape(-1, vocab_size)
        shift_labels = shift_labels.reshape(-1).to(logits.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = nn.functional.cross_entropy(
            logits, shift_labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=epsilon
        )
        if num_items_in_batch is not None:  # Trainer's count of the labels of the whole (accumulated) step
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss

    return loss_function


def smooth_labels_in_the_model(trainer: Trainer) -> None:
    """Move the Trainer's label smoothing into the model's loss, which adds the balancing losses to it."""
    epsilon = trainer.args.label_smoothing_factor
    if not epsilon:
        return
    unwrap_moe_model(trainer.model).loss_function = label_smoothed_causal_lm_loss(epsilon)
    trainer.label_smoother = None  # the labels now reach the model
