"""`--label_smoothing_factor` without losing the balancing losses.

With a label smoothing factor, Trainer takes the labels away from the model and computes the loss from the logits
alone, so the importance and load losses (SPEC §3) would silently drop out of training (as OLMoE's aux loss does under
Trainer). Here the labels stay with the model, whose loss function smooths them: the model's loss is then the
label-smoothed LM loss plus its balancing losses, weighted as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LabelSmoother

from .callbacks import unwrap_moe_model


def label_smoothed_causal_lm_loss(epsilon: float) -> Callable[..., torch.Tensor]:
    """The model's `loss_function` with Trainer's own smoothing: transformers' `LabelSmoother(epsilon)` on the shifted
    labels, `(1 - epsilon) * NLL + epsilon * mean over the vocabulary of -log p`, per label of the (accumulated) step."""

    def loss_function(
        logits: torch.Tensor,  # (batch, seq, vocab)
        labels: torch.Tensor,  # (batch, seq)
        vocab_size: int,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        smoother = LabelSmoother(epsilon=epsilon, ignore_index=ignore_index)
        outputs = {"logits": logits.float()}  # upcast, as `ForCausalLMLoss` does
        if shift_labels is None:  # tokens < t predict t
            labels = labels.to(logits.device)
            return smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
        return smoother(outputs, shift_labels.to(logits.device), num_items_in_batch=num_items_in_batch)

    return loss_function


def smooth_labels_in_the_model(trainer: Trainer) -> None:
    """Move the Trainer's label smoothing into the model's loss, which adds the balancing losses to it."""
    epsilon = trainer.args.label_smoothing_factor
    if not epsilon:
        return
    unwrap_moe_model(trainer.model).loss_function = label_smoothed_causal_lm_loss(epsilon)
    trainer.label_smoother = None  # the labels now reach the model
