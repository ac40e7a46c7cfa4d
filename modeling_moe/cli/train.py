"""`moe-train`: pretrain a sparsely-gated MoE language model from a config file, or fine-tune a saved one, with the
Transformers `Trainer`; log the experts' balance, evaluate, generate a sample and write / push a Hub-ready folder.

In the spirit of transformers' `examples/pytorch/language-modeling/run_clm.py`:

    moe-train --config configs/tiny.json --output_dir runs/tiny --max_steps 300 --dry_run
    moe-train --model_name_or_path runs/tiny --train_file my.txt --output_dir runs/ft --lora --merge

Expert parallelism (SPEC §6): one process per device, experts sharded over `N` of them, e.g. on CPU

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 scripts/train.py --expert_parallel 2 --config configs/tiny.json ...

(the README's "Expert parallelism" section has the GPU and `accelerate launch` commands).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import transformers
from datasets import Dataset, IterableDataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerState,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from ..configuration_moe import MoEConfig
from ..expert_parallel import (
    EXPERT_PARALLEL_TRAINING_ARGS,
    from_config_expert_parallel,
    from_pretrained_expert_parallel,
    init_distributed,
    local_expert_parameters,
    validate_expert_parallel_size,
)
from ..modeling_moe import MoEForCausalLM
from ..training.arguments import (
    DataArguments,
    ModelArguments,
    RunArguments,
    check_config_fields,
    check_minimums,
    check_output_dir,
    load_config_file,
    parse_overrides,
    resolve_block_size,
)
from ..training.callbacks import unwrap_moe_model
from ..training.data import (
    DEFAULT_CORPUS_NAME,
    MIN_BPE_VOCAB_SIZE,
    check_validation_split_percentage,
    first_samples,
    iter_texts,
    load_raw_datasets,
    load_tokenizer,
    resolve_text_column,
    tokenize_and_pack,
    train_bpe_tokenizer,
)
from ..training.evaluation import (
    build_trainer,
    format_table,
    parameter_counts,
    summary_rows,
)
from ..training.hub import (
    check_hub_folder,
    create_hub_repo,
    render_model_card,
    upload_hub_folder,
    write_hub_folder,
)
from .cpu_malloc import reuse_freed_memory

logger = logging.getLogger("modeling_moe.train")

# Written last when a model folder is moved into place: until they exist the folder does not load.
_MARKER_FILES = ("config.json", "adapter_config.json")
# Under `--expert_parallel`: where rank 0 puts the tokenizer and the initial weights every rank loads, and the staging
# folder the gathered final model is written to (fixed names: every rank must agree on them without talking).
_EP_INIT_DIR = ".ep-init"
_EP_STAGING_DIR = ".tmp-save-ep"
# Vocabulary of the BPE trained from scratch when neither the config file nor `--tokenizer_vocab_size` sets one.
DEFAULT_BPE_VOCAB_SIZE = 8192


def _config_vocab_size(config_fields: dict[str, Any] | None) -> int:
    """The vocabulary of the BPE trained from scratch for `config_fields` (a `--config` run's): its `vocab_size`."""
    return int((config_fields or {}).get("vocab_size", DEFAULT_BPE_VOCAB_SIZE))


def save_atomically(save: Any, output_dir: str) -> None:
    """Run `save(staging_dir)` in a temporary folder inside `output_dir`, then move the files into `output_dir`.

    A failure while saving leaves `output_dir` without a loadable model: the config files are removed first and moved
    in last, and `from_pretrained` needs them.
    """
    os.makedirs(output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-save-", dir=output_dir)
    try:
        save(staging)
        _move_into(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: str, output_dir: str) -> None:
    """Move the files of `staging` into `output_dir`, the marker (config) files removed first and moved in last."""
    for marker in _MARKER_FILES:
        target = os.path.join(output_dir, marker)
        if os.path.exists(target):
            os.remove(target)
    names = sorted(os.listdir(staging), key=lambda name: name in _MARKER_FILES)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)


def save_expert_parallel(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, output_dir: str) -> None:
    """`save_atomically` for a model sharded over ranks: every rank joins the gather, only rank 0 touches `output_dir`.

    `Trainer.save_model` of a model sharded at load time runs `save_pretrained` on every rank (the weights are gathered
    collectively) and rank 0 writes one ordinary checkpoint, into a staging folder; rank 0 then adds the tokenizer and
    moves the files into `output_dir`. The barriers keep the other ranks from going on (or exiting) before it is done.
    """
    staging = os.path.join(output_dir, _EP_STAGING_DIR)
    is_main = dist.get_rank() == 0
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    try:
        trainer.save_model(staging)
        dist.barrier()
        if is_main:
            tokenizer.save_pretrained(staging)
            _move_into(staging, output_dir)
    finally:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


def _num_experts(model_args: ModelArguments, config_fields: dict[str, Any] | None) -> int:
    """`num_experts` of the model to be trained, read before anything is built (for early `--expert_parallel` checks)."""
    if config_fields is not None:
        return MoEConfig(**config_fields).num_experts
    return MoEConfig.from_pretrained(model_args.model_name_or_path).num_experts


def check_arguments(
    model_args: ModelArguments, data_args: DataArguments, run_args: RunArguments, training_args: TrainingArguments
) -> dict[str, Any] | None:
    """Every check that needs no data, tokenizer or model, made before any of them is loaded: returns the config fields
    of a model trained from scratch (file + overrides, validated by building a `MoEConfig`), else None."""
    if (model_args.config is None) == (model_args.model_name_or_path is None):
        raise ValueError("Pass exactly one of `--config` (train from scratch) or `--model_name_or_path` (fine-tune).")
    if run_args.merge and not run_args.lora:
        raise ValueError("`--merge` merges LoRA adapters: pass it together with `--lora`.")
    if run_args.lora and model_args.model_name_or_path is None:
        raise ValueError(
            "`--lora` fine-tunes adapters on a trained model: pass `--model_name_or_path` (with `--config` the base "
            "model would be random and never saved)."
        )
    # run_clm.py trains only with `--do_train` and evaluates with `--do_eval`; moe-train always trains. `do_eval` alone
    # (TrainingArguments sets it by itself only with an `eval_strategy`) asks for an evaluation-only run, which
    # would otherwise train the model and overwrite it.
    explicit = [f"--{name}" for name in ("do_eval", "do_predict") if getattr(training_args, name)]
    if explicit and not training_args.do_train and training_args.eval_strategy == "no":
        raise ValueError(
            f"{' and '.join(explicit)} without `--do_train` asks for an evaluation-only run, but moe-train always "
            "trains: evaluate a saved model with `moe-eval --model_name_or_path ...`, or add `--do_train` to train and "
            "then evaluate."
        )
    if model_args.config_overrides and model_args.config is None:
        raise ValueError("`config_overrides` only applies when training from scratch with `--config`.")
    implementation = model_args.experts_implementation
    valid_implementations = ["eager", *ALL_EXPERTS_FUNCTIONS.valid_keys()]
    if implementation is not None and implementation not in valid_implementations:
        raise ValueError(f"`experts_implementation` must be one of {valid_implementations}, got {implementation!r}.")
    if data_args.streaming and training_args.max_steps <= 0:
        raise ValueError("`--streaming` needs `--max_steps` (a streamed dataset has no length).")
    check_minimums(data_args, {"block_size": 2, "max_train_samples": 1, "max_eval_samples": 1})
    check_validation_split_percentage(data_args.validation_split_percentage)
    check_minimums(model_args, {"tokenizer_vocab_size": MIN_BPE_VOCAB_SIZE, "tokenizer_train_max_chars": 1})
    if run_args.lora:
        check_minimums(run_args, {"lora_r": 1})
        if not 0 <= run_args.lora_dropout <= 1:
            raise ValueError(f"`lora_dropout` must be in [0, 1], got {run_args.lora_dropout}.")
        if run_args.lora_dropout > 0 and run_args.lora_experts:
            # PEFT's LoRA on the fused expert weights (`target_parameters`) refuses any dropout, which it would raise
            # only once the data, the tokenizer and the model are loaded, without naming these options.
            raise ValueError(
                f"`--lora_dropout {run_args.lora_dropout}` applies to the attention projections only, but LoRA on the "
                "fused expert weights (`--lora_experts`, on by default) takes no dropout in PEFT: pass "
                "`--lora_experts false` to use dropout, or `--lora_dropout 0`."
            )
    # TrainingArguments accepts 0; the DataLoader would reject it only when it is built (for evaluation: after training).
    check_minimums(training_args, {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1})
    fields = None
    if model_args.config is not None:
        source = f"config file {model_args.config!r}"
        fields = check_config_fields(load_config_file(model_args.config), MoEConfig, source)
        fields.update(
            check_config_fields(parse_overrides(model_args.config_overrides), MoEConfig, "`config_overrides`")
        )
        max_positions = MoEConfig(**fields).max_position_embeddings  # bad values fail here, naming the field
        if model_args.tokenizer_name is None and model_args.tokenizer_vocab_size is None:
            # The BPE trained from scratch gets the config's vocab_size.
            vocab_size = _config_vocab_size(fields)
            if vocab_size < MIN_BPE_VOCAB_SIZE:
                raise ValueError(
                    f"`vocab_size` {vocab_size} ({source} / `config_overrides`) is too small for the byte-level BPE "
                    f"trained from scratch: at least {MIN_BPE_VOCAB_SIZE} (bytes + specials), or pass "
                    "`--tokenizer_name`."
                )
    elif os.path.isfile(os.path.join(model_args.model_name_or_path, "adapter_config.json")):
        # Loaded as a model, a folder of LoRA adapters is its base model with frozen adapters on top: training it
        # fails with "element 0 of tensors does not require grad", or, with `--lora`, PEFT refuses a second wrap.
        with open(os.path.join(model_args.model_name_or_path, "adapter_config.json"), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
        raise ValueError(
            f"`model_name_or_path` {model_args.model_name_or_path!r} holds LoRA adapters (adapter_config.json), not a "
            f"model to fine-tune: pass their merged model (`--merge` writes it to `<output_dir>/merged`) or their base "
            f"model {base!r} (with `--lora` for new adapters)."
        )
    else:
        config = AutoConfig.from_pretrained(
            model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **model_args.hub_kwargs
        )
        # Otherwise found only once the data, the tokenizer and the whole model are loaded (`unwrap_moe_model`).
        if config.model_type != MoEConfig.model_type:
            raise ValueError(
                f"`model_name_or_path` {model_args.model_name_or_path!r} holds a {config.model_type!r} model, not a "
                f"sparsely-gated MoE ({MoEConfig.model_type!r}): moe-train fine-tunes MoEForCausalLM models."
            )
        max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None:
        resolve_block_size(data_args.block_size, max_positions)
    return fields


def setup_expert_parallel(
    model_args: ModelArguments,
    run_args: RunArguments,
    training_args: TrainingArguments,
    config_fields: dict[str, Any] | None = None,
) -> int:
    """Check `--expert_parallel N`, join the process group (bounded timeout) and set the Trainer arguments it needs.

    Returns `N`. Fails early, naming the option, for what an expert-parallel run does not support: LoRA (PEFT on an
    FSDP2-sharded model), resuming (Trainer cannot checkpoint the optimizer of a model sharded at load time) and
    loading the best checkpoint at the end (Trainer copies its plain tensors into the sharded ones, which fails).
    """
    size = run_args.expert_parallel
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`expert_parallel` must be a positive integer, got {size!r}.")
    if size == 1:
        return size
    resume = training_args.resume_from_checkpoint
    unsupported = [
        name
        for name, used in (
            ("--lora", run_args.lora),
            ("--resume_from_checkpoint", resume is not None and str(resume).lower() not in ("false", "none", "")),
            ("--load_best_model_at_end", training_args.load_best_model_at_end),
        )
        if used
    ]
    if unsupported:
        raise ValueError(
            f"`--expert_parallel {size}` does not support {' and '.join(unsupported)}: train without expert "
            "parallelism for LoRA, start from a saved model (`--model_name_or_path`) instead of resuming, and pick the "
            "best of the saved checkpoints (ordinary ones) yourself instead of loading it at the end."
        )
    validate_expert_parallel_size(size, _num_experts(model_args, config_fields))
    # Keep a `ddp_timeout` the user chose; replace only TrainingArguments' default (30 min) by the bounded one.
    default_timeout = TrainingArguments.__dataclass_fields__["ddp_timeout"].default
    if training_args.ddp_timeout == default_timeout:
        training_args.ddp_timeout = EXPERT_PARALLEL_TRAINING_ARGS["ddp_timeout"]
    for name, value in EXPERT_PARALLEL_TRAINING_ARGS.items():
        if name != "ddp_timeout":
            setattr(training_args, name, value)
    # `--use_cpu` keeps the model on the CPU: its collectives need gloo even where CUDA is available (nccl would
    # take no CPU tensor: "No backend type associated with device type cpu").
    init_distributed(training_args.ddp_timeout, use_cpu=training_args.use_cpu)
    return size


def _last_complete_checkpoint(output_dir: str) -> str:
    """The newest `checkpoint-<step>` of `output_dir` that Trainer finished writing (`trainer_state.json` is written
    last): a run killed while saving leaves a newer, partial one, which is skipped with a warning."""
    partial = []
    for path in reversed(sort_checkpoints(output_dir) if os.path.isdir(output_dir) else []):
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            if partial:
                logger.warning(
                    "Resuming from %s: skipped the partly written %s (no %s).",
                    os.path.basename(path),
                    partial,
                    TRAINER_STATE_NAME,
                )
            return path
        partial.append(os.path.basename(path))
    found = f" (only partly written ones, without {TRAINER_STATE_NAME}: {partial})" if partial else ""
    raise ValueError(f"`resume_from_checkpoint`: no complete checkpoint found in {output_dir!r}{found}.")


def _resolve_resume(training_args: TrainingArguments) -> str | None:
    resume = training_args.resume_from_checkpoint
    if resume is None or str(resume).lower() in ("false", "none", ""):
        # A new run must not share `output_dir` with an earlier run's checkpoints: its own `checkpoint-<step>` folders
        # would sit beside (and partly replace) them, and `--resume_from_checkpoint true` after an interruption would
        # continue the earlier run's newest checkpoint instead of this run's.
        earlier = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if earlier is not None:
            raise FileExistsError(
                f"`output_dir` {training_args.output_dir!r} already holds checkpoints of an earlier run "
                f"({os.path.basename(earlier)}): pass `--resume_from_checkpoint true` to continue that run, or choose "
                "a new or empty `output_dir` to start a new one."
            )
        return None
    if str(resume).lower() in ("true", "last", "latest"):
        resume = _last_complete_checkpoint(training_args.output_dir)
    elif not os.path.isfile(os.path.join(resume, TRAINER_STATE_NAME)):
        raise FileNotFoundError(
            f"`resume_from_checkpoint` {resume!r} is not a checkpoint folder (no {TRAINER_STATE_NAME} in it)."
        )
    # Trainer resumes a checkpoint saved with `--save_only_model` silently with a new optimizer and a restarted
    # learning-rate schedule: that does not continue the run.
    if not any(name.startswith("optimizer") for name in os.listdir(resume)):
        raise ValueError(
            f"`resume_from_checkpoint` {resume!r} holds no optimizer or scheduler state (saved with "
            "`--save_only_model`?), so training cannot continue from it; start a new run from its weights with "
            "`--model_name_or_path` instead."
        )
    return resume


def build_tokenizer(
    model_args: ModelArguments,
    resume: str | None,
    raw_train: Dataset | IterableDataset,
    text_column: str,
    target_vocab: int,
) -> PreTrainedTokenizerBase:
    """The tokenizer: named, from the checkpoint being resumed, the fine-tuned model's, or a BPE trained on the data."""
    if model_args.tokenizer_name is not None:
        tokenizer = load_tokenizer(model_args.tokenizer_name, **model_args.hub_kwargs)
    elif resume is not None and os.path.isfile(os.path.join(resume, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(resume)
    elif model_args.model_name_or_path is not None:
        tokenizer = load_tokenizer(model_args.model_name_or_path, **model_args.hub_kwargs)
    else:
        vocab_size = model_args.tokenizer_vocab_size or target_vocab
        logger.info("Training a byte-level BPE tokenizer (vocab %d) on the training text", vocab_size)
        texts = iter_texts(raw_train, text_column, max_chars=model_args.tokenizer_train_max_chars)
        tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, model_max_length=1_000_000)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    model_args: ModelArguments,
    tokenizer: PreTrainedTokenizerBase,
    expert_parallel: int = 1,
    init_dir: str | None = None,
    config_fields: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A fresh `MoEForCausalLM` from `config_fields` (`check_arguments`: `--config` + overrides), or else the model of
    `--model_name_or_path`.

    With `expert_parallel > 1` (every rank calls it) the experts are sharded over the ranks at load time; from scratch,
    rank 0 initializes the model and writes it to `init_dir`, which every rank then loads.
    """
    extra = {}
    if model_args.experts_implementation is not None:
        extra["experts_implementation"] = model_args.experts_implementation
    if config_fields is not None:
        config = MoEConfig(
            **{
                **config_fields,
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
        if expert_parallel > 1:
            return from_config_expert_parallel(config, expert_parallel, init_dir, **extra)
        model = MoEForCausalLM(config)
        if extra:
            model.set_experts_implementation(extra["experts_implementation"])
        return model
    if expert_parallel > 1:
        model = from_pretrained_expert_parallel(
            model_args.model_name_or_path, expert_parallel, **model_args.hub_kwargs, **extra
        )
        if model.config.vocab_size < len(tokenizer):
            raise ValueError(
                f"The tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}; "
                "resizing the embeddings is not supported with `--expert_parallel`: resize in a single process first."
            )
        return model
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code, **model_args.hub_kwargs, **extra
    )
    unwrap_moe_model(model)  # raises a clear error for a model that is not a sparsely-gated MoE
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return model


def apply_lora(model: torch.nn.Module, run_args: RunArguments) -> torch.nn.Module:
    """LoRA on the attention projections and, through `target_parameters`, on the fused 3-D expert weights."""
    from peft import LoraConfig, get_peft_model

    target_parameters = None
    if run_args.lora_experts:
        up = "gate_up_proj" if model.config.expert_activation == "swiglu" else "up_proj"
        target_parameters = [f"mlp.experts.{up}", "mlp.experts.down_proj"]
    lora_config = LoraConfig(
        r=run_args.lora_r,
        lora_alpha=run_args.lora_alpha,
        lora_dropout=run_args.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=target_parameters,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def generate_sample(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int, seed: int = 0
) -> str:
    """A sampled continuation of `prompt` (temperature 0.8, top-p 0.95, seeded so a run prints the same sample)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=0.8,
            top_p=0.95,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def dataset_description(data_args: DataArguments) -> tuple[list[str] | None, str]:
    if data_args.dataset_name is not None:
        name = data_args.dataset_name + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
        return [data_args.dataset_name], name
    if data_args.train_file is not None:
        return None, f"local files ({os.path.basename(data_args.train_file)})"
    return (
        None,
        f"{DEFAULT_CORPUS_NAME} (the Python {sys.version_info.major}.{sys.version_info.minor} documentation topics, pydoc_data)",
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, RunArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json") and "--" not in argv[0]:
        return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(yaml_file=os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the main job; returns the metrics, the paths written, the sample, the log history and what was done to
    the CPU malloc (`cpu_malloc.reuse_freed_memory`; None: nothing)."""
    model_args, data_args, run_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()

    config_fields = check_arguments(model_args, data_args, run_args, training_args)
    push = training_args.push_to_hub
    # The Trainer would create the repo at init and push every checkpoint; this CLI pushes the final folder itself
    # (and creates the repo below, before anything is trained, as the Trainer would).
    training_args.push_to_hub = False
    hub_dir = run_args.hub_export_dir or os.path.join(training_args.output_dir, "hub_export")
    if push or run_args.dry_run:
        check_hub_folder(hub_dir, keep=training_args.output_dir)
        # The export is written into a sibling of `hub_dir` after training: its parent must be writable now.
        check_output_dir(os.path.dirname(os.path.abspath(hub_dir)), argument="hub_export_dir")
    expert_parallel = setup_expert_parallel(model_args, run_args, training_args, config_fields)
    cpu_malloc = None
    if run_args.reuse_freed_memory and training_args.device.type == "cpu":
        cpu_malloc = reuse_freed_memory()
        logger.info("CPU malloc: %s", cpu_malloc)
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    check_output_dir(training_args.output_dir)
    resume = _resolve_resume(training_args)
    repo_id = training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))
    if push and not run_args.dry_run and training_args.should_save:
        create_hub_repo(repo_id, token=training_args.hub_token, private=training_args.hub_private_repo)
    set_seed(training_args.seed)

    # Data, then the tokenizer (the BPE is trained on the training text), then the model.
    raw = load_raw_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        validation_split_percentage=data_args.validation_split_percentage,
        streaming=data_args.streaming,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
    text_column = resolve_text_column(raw["train"], data_args.text_column_name)
    resolve_text_column(raw["validation"], text_column)
    target_vocab = _config_vocab_size(config_fields)
    init_dir = os.path.join(training_args.output_dir, _EP_INIT_DIR)
    if expert_parallel > 1:
        # Every rank must use the same tokenizer (and so the same vocab_size): rank 0 builds (or trains) it and writes
        # it to `init_dir`, every rank loads that copy.
        if is_main:
            shutil.rmtree(init_dir, ignore_errors=True)
            build_tokenizer(model_args, resume, raw["train"], text_column, target_vocab).save_pretrained(init_dir)
        dist.barrier()
        tokenizer = AutoTokenizer.from_pretrained(init_dir)
    else:
        tokenizer = build_tokenizer(model_args, resume, raw["train"], text_column, target_vocab)
    model = build_model(model_args, tokenizer, expert_parallel, init_dir, config_fields)
    if expert_parallel > 1:
        dist.barrier()  # every rank has loaded its shard from `init_dir`
        if is_main:
            shutil.rmtree(init_dir, ignore_errors=True)
        shapes = {name: list(shape) for name, shape in local_expert_parameters(model).items()}
        logger.info(
            "expert parallel: rank %d of %d holds local expert weights %s",
            dist.get_rank(),
            dist.get_world_size(),
            json.dumps(shapes),
        )
    config = model.config
    block_size = resolve_block_size(data_args.block_size, config.max_position_embeddings)
    if run_args.lora:
        model = apply_lora(model, run_args)

    with training_args.main_process_first(desc="tokenizing and packing"):
        packed = tokenize_and_pack(raw, tokenizer, text_column, block_size, data_args.preprocessing_num_workers)
    train_dataset, eval_dataset = packed["train"], packed["validation"]
    train_dataset = first_samples(train_dataset, data_args.max_train_samples)
    eval_dataset = first_samples(eval_dataset, data_args.max_eval_samples)

    trainer, balance = build_trainer(
        model,
        training_args,
        tokenizer,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
    )

    if resume is not None:
        balance.load_history(resume)  # the expert-load history saved with that checkpoint
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, Any] = dict(train_result.metrics)
    base_model = unwrap_moe_model(trainer.model)
    if expert_parallel > 1:
        # Gathered on rank 0 into one ordinary checkpoint. Rank 0 reloads it in a single process for everything that
        # needs the whole model outside a collective (parameter counts, the sample, the Hub export).
        save_expert_parallel(trainer, tokenizer, training_args.output_dir)
        base_model = MoEForCausalLM.from_pretrained(training_args.output_dir) if is_main else None
        counts = [parameter_counts(base_model) if is_main else None]
        dist.broadcast_object_list(counts, src=0)
        counts = counts[0]
    else:
        counts = parameter_counts(base_model)  # under LoRA: with the adapters; recounted below once merged
        # Final model (or LoRA adapters) + tokenizer, moved into output_dir only once fully written.
        save_atomically(lambda d: (trainer.save_model(d), tokenizer.save_pretrained(d)), training_args.output_dir)
    trainer.log_metrics("train", train_result.metrics)

    if not run_args.skip_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)

    export_model = base_model
    paths = {"output_dir": training_args.output_dir}
    if run_args.lora and (run_args.merge or push or run_args.dry_run):
        export_model = trainer.model.merge_and_unload()
        counts = parameter_counts(export_model)  # the published model's, without the adapters' tensors
        if run_args.merge:
            merged_dir = os.path.join(training_args.output_dir, "merged")
            save_atomically(lambda d: (export_model.save_pretrained(d), tokenizer.save_pretrained(d)), merged_dir)
            paths["merged_dir"] = merged_dir
    metrics.update(counts)
    trainer.save_metrics("all", metrics)
    trainer.save_state()

    sample = None
    # Under expert parallelism only rank 0 samples, from its single-process copy (a sharded forward is a collective).
    if run_args.sample_prompt and run_args.sample_max_new_tokens > 0 and is_main:
        sample = generate_sample(
            export_model, tokenizer, run_args.sample_prompt, run_args.sample_max_new_tokens, seed=training_args.seed
        )

    if training_args.should_save and (push or run_args.dry_run):
        dataset_ids, description = dataset_description(data_args)
        card = render_model_card(
            export_model.config,
            metrics,
            counts,
            repo_id=repo_id,
            dataset_ids=dataset_ids,
            dataset_description=description,
            training_description=_training_description(training_args, trainer.state, metrics, block_size, run_args),
        )
        write_hub_folder(export_model, tokenizer, card, hub_dir, extra_files_from=training_args.output_dir)
        paths["hub_dir"] = hub_dir
        if push and not run_args.dry_run:
            paths["hub_commit"] = upload_hub_folder(
                hub_dir, repo_id, token=training_args.hub_token, private=training_args.hub_private_repo
            )

    # `should_log` holds on every node's first process; under expert parallelism only rank 0 has the whole model
    # (`export_model` is None elsewhere), so the other nodes print nothing rather than fail at the end of the run.
    if training_args.should_log and export_model is not None:
        print("\n" + format_table(summary_rows(metrics, export_model.config, counts)) + "\n")
        if sample is not None:
            print(f"Sample ({run_args.sample_prompt!r}, sampled):\n{sample}\n")
        for name, path in paths.items():
            print(f"{name}: {path}")
    balance.detach()
    if expert_parallel > 1:
        dist.barrier()  # the other ranks wait for rank 0's export before the process group goes away
        dist.destroy_process_group()
    return {
        "metrics": metrics,
        "paths": paths,
        "sample": sample,
        "log_history": trainer.state.log_history,
        "cpu_malloc": cpu_malloc,
    }


def _training_description(
    training_args: TrainingArguments,
    state: TrainerState,
    metrics: dict[str, Any],
    block_size: int,
    run_args: RunArguments,
) -> str:
    tokens = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * block_size
    parts = [
        f"Trained with the Transformers `Trainer` for {metrics.get('epoch', float('nan')):.2f} epochs",
        f"({state.global_step} steps), learning rate {training_args.learning_rate}, "
        f"{tokens} tokens per step per device (blocks of {block_size}), seed {training_args.seed}.",
    ]
    if run_args.lora:
        parts.append(f"LoRA (r={run_args.lora_r}, alpha={run_args.lora_alpha}) merged into the weights.")
    if "train_loss" in metrics and math.isfinite(metrics["train_loss"]):
        parts.append(f"Final mean training loss (LM + balancing): {metrics['train_loss']:.4f}.")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: `run(argv)`, exit status 0 (console scripts exit with what `main` returns)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
