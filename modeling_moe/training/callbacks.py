"""Trainer callback that makes the experts' balance visible while training (SPEC §3 statistics, paper Table 6)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..cli.files import write_atomically
from ..expert_statistics import ExpertStatistics

HEATMAP_FILENAME = "expert_load_heatmap.png"
HISTORY_FILENAME = "expert_load_history.json"


def unwrap_moe_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `MoEForCausalLM` inside DDP / accelerate / torch.compile / PEFT wrappers."""
    seen = 0
    while seen < 10:
        seen += 1
        if hasattr(model, "expert_statistics") and hasattr(model, "pop_expert_statistics"):
            return model
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module"):  # DistributedDataParallel, accelerate wrappers
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            break
    raise TypeError(f"{type(model).__name__} is not (a wrapper of) a MoEForCausalLM: no `pop_expert_statistics`.")


def moe_layer_indices(model: torch.nn.Module) -> list[int]:
    config = model.config
    indices = getattr(config, "moe_layer_indices", None)
    return list(indices) if indices is not None else list(range(config.num_hidden_layers))


class ExpertBalanceCallback(TrainerCallback):
    """Adds the MoE balance statistics to every log, and draws expert load per layer over training at the end.

    At each logging step the logs get `lm_loss`, `importance_loss`, `load_loss` and, per MoE layer `i`,
    `layer_{i}/cv_importance`, `layer_{i}/cv_load`, `layer_{i}/max_mean_load` (evaluation logs get the same keys with
    the `eval_` prefix). They are computed over all forward passes since the previous log, kept apart for training and
    evaluation forwards through a forward hook on the model, so an evaluation in the middle of a logging interval does
    not mix into the training numbers.

    The callback must see the logs before the console / TensorBoard callbacks do: add it with
    [`add_expert_balance_callback`], which puts it first and attaches the hook at once.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = output_dir
        self._model: torch.nn.Module | None = None
        self._hook = None
        self._stats = {True: ExpertStatistics(), False: ExpertStatistics()}  # keyed by `module.training`
        self._lm_loss = {True: [0.0, 0], False: [0.0, 0]}
        self.history: list[dict[str, Any]] = []  # [{"step": s, "tokens_per_expert": [[...] per MoE layer]}]

    # -- collecting ------------------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> None:
        inner = unwrap_moe_model(model)
        if inner is self._model:
            return
        self.detach()
        self._model = inner
        self._hook = inner.register_forward_hook(self._on_forward, with_kwargs=True)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = None
        self._model = None

    def _on_forward(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        router_outputs = getattr(output, "router_outputs", None)
        if router_outputs:
            self._stats[module.training].add(router_outputs)
        lm_loss = getattr(output, "lm_loss", None)
        if lm_loss is not None:
            value, weight = float(lm_loss.detach()), 1.0
            num_items_in_batch, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
            if labels is not None:
                weight = float((labels[..., 1:] != -100).sum())  # the labels the causal LM loss counts
                if num_items_in_batch is not None and weight:
                    # Trainer passes the label count of the whole step (all micro-batches, and all ranks when it
                    # averages tokens across devices): the LM loss is this batch's share of that mean, not its mean.
                    value *= float(num_items_in_batch) / weight
            # Weighted by labels, so the logged LM loss is the mean over every label of the interval (and of all ranks).
            totals = self._lm_loss[module.training]
            totals[0] += value * weight
            totals[1] += weight

    def _stats_over_ranks(self, training: bool) -> ExpertStatistics:
        """The training or evaluation statistics collected since the last log, summed over the ranks in place."""
        stats = self._stats[training]
        if self._model is not None:
            _sum_statistics_over_ranks(stats, len(moe_layer_indices(self._model)), self._model.config.num_experts)
        return stats

    def _pop(self, training: bool) -> tuple[dict[str, float], list[list[float]]]:
        stats = self._stats_over_ranks(training)
        tokens = stats.tokens_per_expert_by_layer()
        summary = stats.pop(moe_layer_indices(self._model)) if self._model is not None else {}
        total, count = _sum_over_ranks(self._lm_loss[training])
        if count:
            summary = {"lm_loss": total / count, **summary}
        self._lm_loss[training] = [0.0, 0]
        # Keep the model's own running statistics from growing stale: this callback is their reader.
        if self._model is not None:
            self._model.pop_expert_statistics()
        return summary, tokens

    # -- resuming --------------------------------------------------------------------------------------------------
    def load_history(self, checkpoint_dir: str, up_to_step: int | None = None) -> None:
        """Continue the expert-load history saved in `checkpoint_dir` (by `on_save`), when resuming from it. Called
        by `on_train_begin` for `output_dir/checkpoint-<step>`; call it first for a checkpoint elsewhere."""
        path = os.path.join(checkpoint_dir, HISTORY_FILENAME)
        if os.path.isfile(path):
            with open(path) as f:
                history = json.load(f)
            self.history = [entry for entry in history if up_to_step is None or entry["step"] <= up_to_step]

    # -- Trainer events --------------------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if kwargs.get("model") is not None:
            self.attach(kwargs["model"])
        for training in (True, False):  # drop forwards made before training (e.g. a sanity generate)
            self._pop(training)
        if state.global_step > 0 and not self.history:  # resumed: the history up to the checkpoint
            self.load_history(_checkpoint_dir(args, state), up_to_step=state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        # With the checkpoint, so that a run resumed from it continues the history (and the heatmap) instead of
        # starting over.
        checkpoint = _checkpoint_dir(args, state)
        if state.is_world_process_zero and self.history and os.path.isdir(checkpoint):
            # Trainer wrote trainer_state.json before this, so the checkpoint already counts as complete: a run stopped
            # while writing must not leave half a file there, on which resuming would fail.
            write_atomically(os.path.join(checkpoint, HISTORY_FILENAME), json.dumps(self.history))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or self._model is None:
            return
        is_eval = any(key.startswith("eval_") for key in logs)
        is_train = "loss" in logs
        if not (is_eval or is_train):
            return
        summary, tokens = self._pop(training=not is_eval)
        prefix = "eval_" if is_eval else ""
        added = {f"{prefix}{key}": value for key, value in summary.items()}
        logs.update(added)
        # Trainer.log appended a copy of the logs to the history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)
        if is_train and tokens:
            self.history.append({"step": state.global_step, "tokens_per_expert": tokens})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Forwards after the last logging step (or a run shorter than `logging_steps`) still belong in the plot, with
        # every rank's tokens as at a log (every rank ends training, so all of them join the sum).
        tokens = self._stats_over_ranks(True).tokens_per_expert_by_layer()
        if tokens and (not self.history or self.history[-1]["step"] != state.global_step):
            self.history.append({"step": state.global_step, "tokens_per_expert": tokens})
        if not state.is_world_process_zero or not self.history:
            return
        output_dir = self.output_dir or args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, HISTORY_FILENAME), "w") as f:
            json.dump(self.history, f)
        plot_expert_load_heatmap(
            self.history, os.path.join(output_dir, HEATMAP_FILENAME), moe_layer_indices(self._model)
        )


def _checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    """Where `Trainer` saves (and by default resumes) the checkpoint of the current step."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _collective_device() -> torch.device | None:
    """The device this run's collectives take their tensors on; None outside a multi-process run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _sum_over_ranks(values: list[float]) -> list[float]:
    """`values` summed over the ranks of a multi-process run (every rank logs the same steps, so all of them call it)."""
    device = _collective_device()
    if device is None:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _sum_statistics_over_ranks(stats: ExpertStatistics, num_layers: int, num_experts: int) -> None:
    """Replace `stats` by its sums over the ranks of a multi-process run (every rank logs the same steps, so all of
    them call it), so that the logged statistics cover every rank's tokens.

    Evaluation forwards (no autograd, so `reduce_router_statistics` leaves them local), `router_statistics_scope=
    "local"` and the token counts hold each rank's own batch; summed, they are the run's. Importance and Load that
    training already summed over the ranks come back multiplied by the world size, which leaves their CVs and max/mean
    Load unchanged. The losses become the mean per forward over all ranks.
    """
    device = _collective_device()
    if device is None:
        return
    zeros = torch.zeros(num_experts, dtype=torch.float64, device=device)
    have = stats.num_forwards > 0  # a rank without forwards since the last log adds zeros

    def vector(values: list[torch.Tensor], layer: int) -> torch.Tensor:
        return values[layer].to(device=device, dtype=torch.float64) if have else zeros

    parts = [
        torch.tensor(
            [stats.num_forwards, float(stats.importance_loss), float(stats.load_loss)],
            dtype=torch.float64,
            device=device,
        )
    ]
    for layer in range(num_layers):
        parts += [vector(stats.importance, layer), vector(stats.load, layer), vector(stats.tokens_per_expert, layer)]
        dropped = stats.dropped_tokens.get(layer)
        agreement_total, agreement_count = stats.threshold_agreement.get(layer, (0.0, 0))
        optional = [dropped is not None, 0.0 if dropped is None else float(dropped)]
        optional += [float(agreement_total), agreement_count]
        parts.append(torch.tensor(optional, dtype=torch.float64, device=device))
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    num_forwards = int(flat[0])
    stats.reset()
    if num_forwards == 0:
        return
    stats.num_forwards = num_forwards
    stats.importance_loss, stats.load_loss = flat[1].float(), flat[2].float()
    position = 3
    for layer in range(num_layers):
        importance, load, tokens, optional = flat[position : position + 3 * num_experts + 4].split(
            [num_experts, num_experts, num_experts, 4]
        )
        position += 3 * num_experts + 4
        stats.importance.append(importance.float())
        stats.load.append(load.float())
        stats.tokens_per_expert.append(tokens.float())
        if optional[0] > 0:
            stats.dropped_tokens[layer] = optional[1]
        if optional[3] > 0:
            stats.threshold_agreement[layer] = (optional[2], int(optional[3]))


def add_expert_balance_callback(trainer: Trainer, output_dir: str | None = None) -> ExpertBalanceCallback:
    """Create an [`ExpertBalanceCallback`], attach it to `trainer.model` and put it before the logging callbacks."""
    callback = ExpertBalanceCallback(output_dir=output_dir)
    callback.attach(trainer.model)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def plot_expert_load_heatmap(history: list[dict[str, Any]], path: str, layer_indices: list[int]) -> str:
    """PNG heatmap, one panel per MoE layer: share of the routed tokens each expert got (y) at each log step (x).

    A perfectly balanced layer is a flat color at `1 / num_experts`; a collapsed one shows bright rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [entry["step"] for entry in history]
    num_layers = len(history[0]["tokens_per_expert"])
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.0 + 2.2 * num_layers), squeeze=False)
    for layer in range(num_layers):
        counts = torch.tensor([entry["tokens_per_expert"][layer] for entry in history], dtype=torch.float64)
        shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)  # (num_logs, num_experts)
        ax = axes[layer][0]
        num_experts = shares.shape[1]
        # A fixed scale from 0 to twice the balanced share: small fluctuations around balance look flat.
        vmax = max(2.0 / num_experts, float(shares.max()))
        image = ax.imshow(
            shares.T.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest", vmin=0, vmax=vmax
        )
        name = layer_indices[layer] if layer < len(layer_indices) else layer
        ax.set_title(f"MoE layer {name}: share of routed tokens per expert (balanced = {1 / num_experts:.3f})")
        ax.set_ylabel("expert")
        ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, math.ceil(len(steps) / 8)))})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(steps[t]) for t in ticks])
        fig.colorbar(image, ax=ax)
    axes[-1][0].set_xlabel("training step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
