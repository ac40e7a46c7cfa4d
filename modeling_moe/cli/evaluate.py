"""`moe-eval`: perplexity, next-token accuracy and expert utilization of a saved model folder or Hub id.

moe-eval --model_name_or_path runs/tiny                      # the embedded corpus' validation split
moe-eval --model_name_or_path runs/tiny --validation_file my.txt --output_dir runs/tiny-eval
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from datasets import DatasetDict, IterableDatasetDict
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainingArguments, set_seed

from ..training.arguments import check_minimums, check_output_dir, resolve_block_size
from ..training.callbacks import unwrap_moe_model
from ..training.data import (
    check_data_file,
    first_samples,
    load_raw_datasets,
    load_tokenizer,
    resolve_text_column,
    tokenize_and_pack,
)
from ..training.evaluation import (
    build_trainer,
    format_table,
    parameter_counts,
    summary_rows,
)
from .cpu_malloc import reuse_freed_memory
from .train import generate_sample


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Saved model folder (full model or LoRA adapters) or Hub id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the folder's own modeling code."})
    token: str | None = field(default=None, metadata={"help": "Hub token."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub downloads."})
    output_dir: str | None = field(default=None, metadata={"help": "Where `eval_results.json` is written."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Blocks per evaluation batch."})
    seed: int = field(default=42, metadata={"help": "Seed of the sample, as moe-train's `--seed`."})
    sample_prompt: str = field(default="def ", metadata={"help": "Prompt of a sample ('' skips it)."})
    sample_max_new_tokens: int = field(default=40, metadata={"help": "Tokens of the sample ('0' skips it)."})
    use_cpu: bool = field(default=False, metadata={"help": "Evaluate on CPU even where an accelerator exists."})
    reuse_freed_memory: bool = field(
        default=True,
        metadata={
            "help": "On a CPU under glibc's default malloc: keep freed memory (logits, activations) for the next "
            "batches instead of faulting in fresh pages every batch, as moe-train does (the process keeps its peak "
            "memory). A preloaded tcmalloc / jemalloc or a set `GLIBC_TUNABLES` are left as they are."
        },
    )


@dataclass
class EvalDataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    validation_file: str | None = field(default=None, metadata={"help": "Local .txt / .json / .jsonl / .csv file."})
    dataset_split: str = field(default="validation", metadata={"help": "Split evaluated when `dataset_name` is set."})
    text_column_name: str | None = field(default=None, metadata={"help": "Column with the text."})
    block_size: int | None = field(default=None, metadata={"help": "Tokens per block (default: min(128, max pos))."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate only this many blocks."})


def load_model(args: EvalArguments) -> torch.nn.Module:
    """A full model folder / Hub id, or a folder of LoRA adapters (loaded on their base model)."""
    kwargs = {"trust_remote_code": args.trust_remote_code, "token": args.token, "cache_dir": args.cache_dir}
    if os.path.isfile(os.path.join(args.model_name_or_path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        return AutoPeftModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)
    if os.path.isdir(args.model_name_or_path) and not os.path.isfile(
        os.path.join(args.model_name_or_path, "config.json")
    ):
        raise FileNotFoundError(
            f"`model_name_or_path` {args.model_name_or_path!r} has no config.json: not a saved model."
        )
    return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = HfArgumentParser((EvalArguments, EvalDataArguments))
    args, data_args = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    transformers.utils.logging.set_verbosity_warning()
    check_minimums(data_args, {"block_size": 2, "max_eval_samples": 1})
    check_minimums(args, {"per_device_eval_batch_size": 1})
    # The data arguments are checked before the model is loaded (the file is read as `train_file` below).
    if data_args.dataset_name is not None and data_args.validation_file is not None:
        raise ValueError("Pass either `dataset_name` or `validation_file`, not both.")
    if data_args.validation_file is not None:
        check_data_file(data_args.validation_file, "validation_file")
    if args.output_dir is not None:
        check_output_dir(args.output_dir)
    set_seed(args.seed)

    model = load_model(args)
    base = unwrap_moe_model(model)
    block_size = resolve_block_size(data_args.block_size, base.config.max_position_embeddings)
    tokenizer = load_tokenizer(
        args.tokenizer_name or args.model_name_or_path, token=args.token, cache_dir=args.cache_dir
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    if data_args.dataset_name is not None:
        raw = load_raw_datasets(
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            streaming=data_args.streaming,
            token=args.token,
            cache_dir=args.cache_dir,
        )
        if data_args.dataset_split not in raw:
            raise ValueError(f"`dataset_split` {data_args.dataset_split!r} not in the dataset (splits: {list(raw)}).")
        split = raw[data_args.dataset_split]
    elif data_args.validation_file is not None:
        raw = load_raw_datasets(train_file=data_args.validation_file, validation_file=data_args.validation_file)
        split = raw["validation"]
    else:
        split = load_raw_datasets(streaming=data_args.streaming)["validation"]
    text_column = resolve_text_column(split, data_args.text_column_name)
    container = IterableDatasetDict if data_args.streaming else DatasetDict
    eval_dataset = tokenize_and_pack(container({"validation": split}), tokenizer, text_column, block_size)["validation"]
    eval_dataset = first_samples(eval_dataset, data_args.max_eval_samples)

    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=args.output_dir or scratch,
            per_device_eval_batch_size=args.per_device_eval_batch_size,
            report_to="none",
            use_cpu=args.use_cpu,
            seed=args.seed,
            disable_tqdm=True,
        )
        cpu_malloc = None
        if args.reuse_freed_memory and training_args.device.type == "cpu":
            cpu_malloc = reuse_freed_memory()
        trainer, callback = build_trainer(model, training_args, tokenizer, eval_dataset=eval_dataset)
        metrics: dict[str, Any] = dict(trainer.evaluate())
        callback.detach()
    counts = parameter_counts(base)
    metrics.update(counts)
    sample = None
    if args.sample_prompt and args.sample_max_new_tokens > 0:
        sample = generate_sample(model, tokenizer, args.sample_prompt, args.sample_max_new_tokens, seed=args.seed)
    if args.output_dir is not None:
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
    print("\n" + format_table(summary_rows(metrics, base.config, counts)) + "\n")
    if sample is not None:
        print(f"Sample ({args.sample_prompt!r}, sampled):\n{sample}\n")
    return {"metrics": metrics, "sample": sample, "cpu_malloc": cpu_malloc}


def main(argv: list[str] | None = None) -> int:
    """Console entry point: `run(argv)`, exit status 0 (console scripts exit with what `main` returns)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
