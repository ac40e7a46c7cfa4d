"""`moe-push`: publish a trained model folder to the Hugging Face Hub with a rendered model card.

Uploads safetensors weights, config (with `auto_map`), the modeling source files (remote code), the tokenizer, the
model card (`hub_card.md` rendered with the run's numbers from `all_results.json` / `eval_results.json`) and the
expert-load heatmap. `--dry_run` writes exactly that folder and uploads nothing.

    moe-push --model_path runs/tiny --repo_id me/tiny-moe --dry_run --output_dir runs/tiny-hub
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from transformers import HfArgumentParser

from ..training.callbacks import unwrap_moe_model
from ..training.data import load_tokenizer
from ..training.evaluation import parameter_counts
from ..training.hub import check_hub_folder, render_model_card, upload_hub_folder, write_hub_folder
from .evaluate import EvalArguments, load_model

METRICS_FILES = ("all_results.json", "eval_results.json")


@dataclass
class PushArguments:
    model_path: str = field(metadata={"help": "Folder written by moe-train (full model, or LoRA adapters to merge)."})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repo, 'user/name' (default: the folder's name)."})
    dry_run: bool = field(default=False, metadata={"help": "Write the folder that would be uploaded; upload nothing."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where the upload folder is written (default: `model_path/hub_export`)."}
    )
    metrics_file: str | None = field(
        default=None, metadata={"help": "JSON of the run's metrics (default: all_results.json in model_path)."}
    )
    dataset_name: list[str] | None = field(default=None, metadata={"help": "Hub dataset id(s) for the card metadata."})
    dataset_description: str = field(
        default="the training corpus", metadata={"help": "Words naming the evaluation data in the card."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the cached login)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the folder's own modeling code."})


def read_metrics(args: PushArguments) -> dict[str, Any]:
    if args.metrics_file is not None:
        if not os.path.isfile(args.metrics_file):
            raise FileNotFoundError(f"`metrics_file` {args.metrics_file!r} does not exist.")
        paths = [args.metrics_file]
    else:
        paths = [os.path.join(args.model_path, name) for name in METRICS_FILES]
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                try:
                    metrics = json.load(f)
                except json.JSONDecodeError as error:
                    raise ValueError(f"Metrics file {path!r} is not valid JSON: {error}") from error
            if not isinstance(metrics, dict):
                raise ValueError(f"Metrics file {path!r} must hold a mapping of metrics, got {type(metrics).__name__}.")
            return metrics
    return {}


def run(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(PushArguments).parse_args_into_dataclasses(
        args=list(sys.argv[1:] if argv is None else argv)
    )
    if not os.path.isdir(args.model_path):
        raise FileNotFoundError(f"`model_path` {args.model_path!r} is not a folder.")
    folder = args.output_dir or os.path.join(args.model_path, "hub_export")
    check_hub_folder(folder, keep=args.model_path)
    metrics = read_metrics(args)
    model = load_model(EvalArguments(model_name_or_path=args.model_path, trust_remote_code=args.trust_remote_code))
    if hasattr(model, "merge_and_unload"):  # LoRA adapters: publish the merged model
        model = model.merge_and_unload()
    model = unwrap_moe_model(model)
    tokenizer = load_tokenizer(args.model_path)
    counts = parameter_counts(model)
    repo_id = args.repo_id or os.path.basename(os.path.abspath(args.model_path))
    card = render_model_card(
        model.config,
        metrics,
        counts,
        repo_id=repo_id,
        dataset_ids=args.dataset_name,
        dataset_description=args.dataset_description,
    )
    write_hub_folder(model, tokenizer, card, folder, extra_files_from=args.model_path)
    result: dict[str, Any] = {"folder": folder, "repo_id": repo_id}
    if args.dry_run:
        print(f"Dry run: the folder that would be uploaded to {repo_id!r} is {folder}")
    else:
        result["commit"] = upload_hub_folder(
            folder, repo_id, token=args.token, private=args.private, commit_message=args.commit_message
        )
        print(f"Uploaded {folder} to {repo_id}: {result['commit']}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Console entry point: `run(argv)`, exit status 0 (console scripts exit with what `main` returns)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
