"""Command-line arguments of `moe-train` / `moe-eval` (parsed with `HfArgumentParser`, like transformers' run_clm.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelArguments:
    """Which model to train: from scratch from a config file, or a saved model / Hub id to fine-tune."""

    config: str | None = field(
        default=None,
        metadata={
            "help": "Model config file (JSON or YAML with MoEConfig fields) to train from scratch, e.g. configs/tiny.json."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Saved model folder or Hub id to fine-tune (instead of `--config`)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config fields when training from scratch: 'num_experts=16,num_experts_per_tok=4'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id. Default: the model's, or a byte-level BPE trained on the data."},
    )
    tokenizer_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of the BPE trained from scratch (default: `vocab_size` of the config file)."
        },
    )
    tokenizer_train_max_chars: int = field(
        default=20_000_000, metadata={"help": "Characters of training text the BPE tokenizer is trained on, at most."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the cached login)."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow remote code for a `--model_name_or_path` saved with its modeling code."}
    )
    experts_implementation: str | None = field(
        default=None,
        metadata={"help": "Experts kernel: 'moe_fused' (the default), 'eager', 'grouped_mm' or 'batched_mm'."},
    )

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """Where `from_pretrained` finds the model, config and tokenizer: cache folder, Hub revision and token."""
        return {"cache_dir": self.cache_dir, "revision": self.model_revision, "token": self.token}


@dataclass
class DataArguments:
    """Which text to train and evaluate on; without any, the Python documentation topics shipped with CPython."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Local training text: .txt, .json, .jsonl or .csv."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation text (same format)."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column with the text (default: 'text', or the only string column)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of train used for validation when there is no validation split."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per packed training block (default: min(128, max_position_embeddings))."},
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs `--max_steps`)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many packed train blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many packed eval blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class RunArguments:
    """What this package adds on top of `TrainingArguments`: LoRA, merge, evaluation, sample and Hub export."""

    lora: bool = field(
        default=False,
        metadata={"help": "Fine-tune LoRA adapters on q/k/v/o_proj and (target_parameters) the fused expert weights."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout on the attention projections (needs `--lora_experts false`)."}
    )
    lora_experts: bool = field(default=True, metadata={"help": "Also put LoRA on the fused expert weights."})
    merge: bool = field(
        default=False, metadata={"help": "With --lora: also write the merged model to `output_dir/merged`."}
    )
    skip_eval: bool = field(default=False, metadata={"help": "Do not evaluate at the end of training."})
    sample_prompt: str = field(
        default="def ", metadata={"help": "Prompt of the sample generated at the end ('' skips it)."}
    )
    sample_max_new_tokens: int = field(default=40, metadata={"help": "Tokens of the sample ('0' skips it)."})
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Write the Hub-ready folder (`--hub_export_dir`) without uploading (with or without --push_to_hub)."
        },
    )
    hub_export_dir: str | None = field(
        default=None, metadata={"help": "Where the Hub-ready folder is written (default: `output_dir/hub_export`)."}
    )
    reuse_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "Training on a CPU under glibc's default malloc: keep freed memory for the next steps instead of "
            "faulting in fresh pages every step (mallopt; the README's `GLIBC_TUNABLES` line at run time; the process "
            "keeps its peak memory). A preloaded tcmalloc / jemalloc or a set `GLIBC_TUNABLES` are left as they are."
        },
    )
    expert_parallel: int = field(
        default=1,
        metadata={
            "help": "Shard every MoE layer's experts over this many processes (SPEC §6; launch one process per device "
            "with torchrun / accelerate launch; must divide the number of processes and `num_experts`). 1: no sharding."
        },
    )


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML model config file into a dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`config` file {path!r} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"`config` file {path!r} is not valid YAML: {error}") from error
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"`config` file {path!r} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"`config` file {path!r} must hold a mapping of config fields, got {type(data).__name__}.")
    return data


def parse_overrides(overrides: str | None) -> dict[str, Any]:
    """'a=1,b=relu,c=[1,3]' -> {'a': 1, 'b': 'relu', 'c': [1, 3]} (values parsed as JSON where they parse)."""
    result: dict[str, Any] = {}
    if not overrides:
        return result
    for item in _split_top_level(overrides):
        if "=" not in item:
            raise ValueError(f"`config_overrides` entry {item!r} is not of the form key=value.")
        key, value = item.split("=", 1)
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value.strip()
    return result


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def check_config_fields(fields: dict[str, Any], config_class: type, source: str) -> dict[str, Any]:
    """Reject fields `config_class` does not define (a typo would otherwise be silently ignored).

    The `model_type` and `auto_map` that `save_pretrained` writes are accepted, so a trained model's `config.json`
    serves as a config file."""
    known = {f.name for f in dataclasses.fields(config_class)}
    fields = dict(fields)
    fields.pop("auto_map", None)  # where the remote code lives: a fresh model gets its own
    model_type = fields.pop("model_type", config_class.model_type)
    if model_type != config_class.model_type:
        raise ValueError(f"{source} has model_type {model_type!r}; expected {config_class.model_type!r}.")
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source} has unknown config field(s) {unknown} for {config_class.__name__}.")
    return fields


def check_output_dir(output_dir: str, argument: str = "output_dir") -> None:
    """Fail early, naming the folder and its `argument`, when `output_dir` cannot be created or written to."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
            pass
    except OSError as error:
        raise PermissionError(f"`{argument}` {output_dir!r} is not writable: {error}") from error


def check_minimums(args: object, minimums: dict[str, int]) -> None:
    """Each named argument of `args` that is set must be at least its minimum (an error naming it otherwise)."""
    for name, least in minimums.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise ValueError(f"`{name}` must be at least {least} (or not set), got {value}.")


def resolve_block_size(block_size: int | None, max_position_embeddings: int) -> int:
    """`--block_size`, or `min(128, max_position_embeddings)` when not set; above the model's positions is an error."""
    if block_size is None:
        return min(128, max_position_embeddings)
    if block_size > max_position_embeddings:
        raise ValueError(
            f"`block_size` ({block_size}) is larger than the model's max_position_embeddings "
            f"({max_position_embeddings})."
        )
    return block_size
