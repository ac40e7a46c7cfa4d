"""Hub export: render `hub_card.md` into a model card and write / upload the folder a Hub repo should hold."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from typing import TYPE_CHECKING, Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .evaluation import balance_summary, format_table

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..configuration_moe import MoEConfig

CARD_TEMPLATE = "hub_card.md"
# How the card names each `router_type` (SPEC §2, §4, §5): (in its text, as a metadata tag).
GATING_NAMES = {
    "noisy_top_k": ("noisy top-k gating", "noisy-top-k-gating"),
    "softmax_top_k": ("softmax top-k gating (no noise)", "softmax-top-k-gating"),
    "hierarchical": (
        "hierarchical noisy top-k gating (groups of experts, then experts within each chosen group)",
        "hierarchical-moe",
    ),
    "balanced": ("strictly balanced batchwise gating (learned per-expert thresholds at inference)", "balanced-gating"),
}
# Files of a run's output folder that travel with the model (besides what save_pretrained writes).
EXTRA_FILES = ("all_results.json", "eval_results.json", "train_results.json", "expert_load_heatmap.png")


def card_template() -> str:
    """The model-card template shipped inside the package (a copy of the repository's top-level `hub_card.md`)."""
    return resources.files("modeling_moe").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8")


def render_model_card(
    config: MoEConfig,
    metrics: dict[str, Any],
    counts: dict[str, int],
    repo_id: str,
    dataset_ids: list[str] | None = None,
    dataset_description: str = "the training corpus",
    training_description: str = "",
) -> ModelCard:
    """A `ModelCard` with valid metadata (library, pipeline, tags, datasets, model-index results) and the run's numbers.

    `metrics` are the run's evaluation metrics (`eval_perplexity`, `eval_accuracy`, `eval_layer_{i}/cv_load`, ...).
    """
    balance = balance_summary(metrics)
    dataset_name = dataset_ids[0] if dataset_ids else "custom"
    eval_results = []
    for key, metric_type, metric_name in (
        ("eval_perplexity", "perplexity", "Perplexity"),
        ("eval_accuracy", "accuracy", "Next-token accuracy"),
    ):
        if key in metrics:
            eval_results.append(
                EvalResult(
                    task_type="text-generation",
                    task_name="Causal language modeling",
                    dataset_type=dataset_name,
                    dataset_name=dataset_description,
                    dataset_split="validation",
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(float(metrics[key]), 4),
                )
            )
    if "cv_load" in balance:
        eval_results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Causal language modeling",
                dataset_type=dataset_name,
                dataset_name=dataset_description,
                dataset_split="validation",
                metric_type="cv_load",
                metric_name="CV(Load), mean over MoE layers",
                metric_value=round(balance["cv_load"], 4),
            )
        )
    moe_layers = list(getattr(config, "moe_layer_indices", []))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license="apache-2.0",
        tags=[
            "mixture-of-experts",
            "moe",
            "sparsely-gated-moe",
            GATING_NAMES[config.router_type][1],
            "custom_code",
            "text-generation",
        ],
        datasets=list(dataset_ids) if dataset_ids else None,
        metrics=["perplexity", "accuracy"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results or None,
        # Extra metadata keys: the MoE geometry and balance, machine-readable.
        moe={
            "num_experts": int(config.num_experts),
            "num_experts_per_tok": int(config.num_experts_per_tok),
            "moe_layers": moe_layers,
            "total_parameters": int(counts["total_parameters"]),
            "active_parameters": int(counts["active_parameters"]),
            **{f"validation_{k}": round(v, 4) for k, v in balance.items()},
        },
    )
    rows: list[tuple[str, Any]] = []
    for key, label in (
        ("eval_perplexity", "perplexity"),
        ("eval_accuracy", "next-token accuracy"),
        ("eval_lm_loss", "LM loss"),
    ):
        if key in metrics:
            rows.append((label, float(metrics[key])))
    labels = {"cv_importance": "CV(Importance)", "cv_load": "CV(Load)", "max_mean_load": "max/mean load"}
    rows += [(f"{labels[k]}, mean over MoE layers", v) for k, v in balance.items()]
    per_layer = [
        (f"layer {i}: CV(Importance) / CV(Load) / max-mean load", _triple(metrics, i))
        for i in moe_layers
        if f"eval_layer_{i}/cv_load" in metrics
    ]
    rows += per_layer
    return ModelCard.from_template(
        card_data,
        template_str=card_template(),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        k=config.experts_per_token,
        num_experts=config.num_experts,
        importance_loss_coef=config.importance_loss_coef,
        load_loss_coef=config.load_loss_coef,
        num_hidden_layers=config.num_hidden_layers,
        num_moe_layers=len(moe_layers),
        hidden_size=config.hidden_size,
        expert_intermediate_size=config.expert_intermediate_size,
        expert_activation=config.expert_activation,
        router_type=config.router_type,
        gating=GATING_NAMES[config.router_type][0],
        total_parameters=f"{counts['total_parameters']:,}",
        active_parameters=f"{counts['active_parameters']:,}",
        vocab_size=config.vocab_size,
        dataset_description=dataset_description,
        results_table=format_table(rows) if rows else "No evaluation was run.",
        training_description=training_description or "See the run's `all_results.json`.",
    )


def _triple(metrics: dict[str, Any], layer: int) -> str:
    values = [metrics.get(f"eval_layer_{layer}/{s}") for s in ("cv_importance", "cv_load", "max_mean_load")]
    return " / ".join(f"{v:.3f}" for v in values if v is not None)


def check_hub_folder(folder: str, keep: str | None = None) -> None:
    """Fail early, naming the folder, unless `write_hub_folder` may replace `folder`: it must not be `keep` (the model
    or run folder the export is made from) or hold it, and if it exists it must be empty or an earlier export (a model
    card `README.md` and a `config.json`, no subfolder), so that nothing else in it is deleted."""
    folder = os.path.abspath(folder)
    if keep is not None and os.path.commonpath([folder, os.path.abspath(keep)]) == folder:
        raise ValueError(
            f"The Hub export folder {folder!r} would replace {keep!r}, the folder it is exported from (or one "
            "holding it): choose another export folder."
        )
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"The Hub export folder {folder!r} exists and is not a folder.")
        names = os.listdir(folder)
        earlier_export = {"README.md", "config.json"} <= set(names) and not any(
            os.path.isdir(os.path.join(folder, name)) for name in names
        )
        if names and not earlier_export:
            raise FileExistsError(
                f"The Hub export folder {folder!r} exists and is not an earlier export (it holds {sorted(names)[:5]}"
                f"{'...' if len(names) > 5 else ''}); it would be replaced: choose a new or empty folder."
            )


def write_hub_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    card: ModelCard,
    folder: str,
    extra_files_from: str | None = None,
) -> str:
    """Write exactly what would be uploaded into `folder`: safetensors weights, config with `auto_map`, the modeling
    source files (remote code), tokenizer, `README.md` (the card) and the run's metrics / heatmap.

    Written into a temporary sibling first and renamed into place, so a failure leaves no half-written folder. An
    earlier export in `folder` is replaced; anything else there is an error (`check_hub_folder`).
    """
    check_hub_folder(folder, keep=extra_files_from)
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-hub-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the published folder should not be
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card.save(os.path.join(staging, "README.md"))
        if extra_files_from is not None:
            for name in EXTRA_FILES:
                source = os.path.join(extra_files_from, name)
                if os.path.isfile(source):
                    shutil.copy2(source, os.path.join(staging, name))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def create_hub_repo(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create the model repo `repo_id` if it does not exist yet (as `Trainer` does when it starts with `push_to_hub`,
    so a missing token or network fails before training); returns its URL."""
    from huggingface_hub import HfApi

    return str(HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))


def upload_hub_folder(
    folder: str, repo_id: str, token: str | None = None, private: bool | None = None, commit_message: str | None = None
) -> str:
    """Create `repo_id` (if needed) and upload `folder` to it; returns the commit URL."""
    from huggingface_hub import HfApi

    create_hub_repo(repo_id, token=token, private=private)
    info = HfApi(token=token).upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload sparsely-gated MoE model",
        repo_type="model",
    )
    return str(getattr(info, "commit_url", info))
