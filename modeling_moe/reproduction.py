"""Shared pieces of the small-scale reproductions of the paper's Tables 6 and 7 (`scripts/reproduce_*.py`).

- Corpus: the Python standard library's own source files (present offline wherever Python is), byte-level tokens
  (vocabulary 256, so perplexity is per byte and exact), split into train / validation by a hash of each file's path.
- Training: AdamW with warmup and cosine decay on random windows of the train bytes; the windows come from a generator
  seeded independently of the model, so every model of a comparison sees exactly the same tokens in the same order.
- Evaluation: validation perplexity over fixed, non-overlapping windows, and the expert statistics of SPEC §3
  (CV(Importance), CV(Load), max/mean Load) accumulated per MoE layer over the whole validation set, in evaluation mode
  (no noise: Load is then the number of tokens each expert receives).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Import every router now (the hierarchical and balanced ones are otherwise imported lazily when a model first uses
# them), so a long run uses one consistent version of the package's source from start to end.
# fast_experts registers the "moe_fused" experts implementation.
from . import balanced_gating, fast_experts, hierarchical_gating  # noqa: F401
from .cli.files import write_atomically
from .configuration_moe import MoEConfig
from .gating import cv_squared
from .modeling_moe import MoEForCausalLM
from .training.arguments import check_output_dir
from .training.evaluation import parameter_counts as training_parameter_counts

# Every VALIDATION_MODULUS-th file by path hash goes to validation (about 10% of the files).
VALIDATION_MODULUS = 10
_EXCLUDED_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Corpus:
    """Byte-level train / validation tokens and a description of where they came from."""

    train: torch.Tensor  # (num_train_bytes,) uint8
    validation: torch.Tensor  # (num_validation_bytes,) uint8
    root: str
    num_train_files: int
    num_validation_files: int
    sha256: str  # of the train bytes followed by the validation bytes: identifies the exact corpus

    def describe(self) -> dict:
        return {
            "root": self.root,
            "train_files": self.num_train_files,
            "validation_files": self.num_validation_files,
            "train_bytes": int(self.train.numel()),
            "validation_bytes": int(self.validation.numel()),
            "sha256": self.sha256,
        }


def stdlib_source_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The standard library's `.py` files under `root` (the running Python's stdlib by default), sorted by path.

    Test suites and installed third-party packages are left out, so the corpus is the library itself.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"Corpus root {str(base)!r} is not a directory.")
    files = [
        p for p in base.rglob("*.py") if p.is_file() and not _EXCLUDED_PARTS.intersection(p.relative_to(base).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def is_validation_file(relative_path: str) -> bool:
    """Fixed split: a file is in validation when the SHA-1 of its relative path is 0 modulo `VALIDATION_MODULUS`."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % VALIDATION_MODULUS == 0


def load_corpus(root: str | os.PathLike | None = None, max_bytes: int | None = None) -> Corpus:
    """Byte-level corpus of the standard library's source, split by file-path hash.

    `max_bytes` stops reading once that many bytes were read (in path order): for quick smoke tests.
    """
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"`max_bytes` must be a positive integer or None, got {max_bytes!r}.")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    train_parts: list[bytes] = []
    validation_parts: list[bytes] = []
    read = 0
    for path in stdlib_source_files(base):
        data = path.read_bytes()
        if not data:
            continue
        # Files are separated by a NUL byte, which never occurs in source text: a document boundary.
        (validation_parts if is_validation_file(path.relative_to(base).as_posix()) else train_parts).append(
            data + b"\0"
        )
        read += len(data) + 1
        if max_bytes is not None and read >= max_bytes:
            break
    if not train_parts or not validation_parts:
        raise ValueError(
            f"The corpus under {str(base)!r} has {len(train_parts)} train and {len(validation_parts)} validation files; "
            "both splits need at least one (raise `max_bytes` or use a larger root)."
        )
    train_bytes, validation_bytes = b"".join(train_parts), b"".join(validation_parts)
    return Corpus(
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8),
        validation=torch.frombuffer(bytearray(validation_bytes), dtype=torch.uint8),
        root=str(base),
        num_train_files=len(train_parts),
        num_validation_files=len(validation_parts),
        sha256=hashlib.sha256(train_bytes + validation_bytes).hexdigest(),
    )


@dataclass
class TrainSettings:
    """Model geometry and training budget shared by every model of one comparison."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    moe_layers: list[int] = field(default_factory=lambda: [1])
    expert_intermediate_size: int = 64
    num_experts_per_tok: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 800
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_batches: int = 32
    seed: int = 0
    data_seed: int = 1234
    log_every: int = 50
    experts_implementation: str = "moe_fused"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "batch_size", "steps", "eval_batches", "expert_intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        if self.seq_len < 2:
            raise ValueError(
                f"`seq_len` must be at least 2 (each sequence predicts its next bytes), got {self.seq_len}."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def model_config(settings: TrainSettings, num_experts: int, **overrides) -> MoEConfig:
    """The comparison's model with `num_experts` experts; `num_experts=0` gives the dense baseline.

    The dense baseline has no MoE layer: its feed-forward blocks all have `num_experts_per_tok *
    expert_intermediate_size` hidden units, the same active size as the MoE layers. The MoE models' non-MoE layers
    use that same dense block.
    """
    if num_experts < 0:
        raise ValueError(f"`num_experts` must be >= 0 (0 = dense baseline), got {num_experts!r}.")
    k = settings.num_experts_per_tok
    common = dict(
        vocab_size=256,
        hidden_size=settings.hidden_size,
        intermediate_size=k * settings.expert_intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        expert_intermediate_size=settings.expert_intermediate_size,
        max_position_embeddings=settings.seq_len,
        tie_word_embeddings=False,
    )
    if num_experts == 0:
        common.update(num_experts=1, num_experts_per_tok=1, moe_layers=[])
    else:
        common.update(num_experts=num_experts, num_experts_per_tok=k, moe_layers=list(settings.moe_layers))
    common.update(overrides)
    return MoEConfig(**common)


def parameter_counts(model: MoEForCausalLM) -> dict[str, int]:
    """Total parameters, and active ones: those one token's forward pass multiplies by (its experts only)."""
    counts = training_parameter_counts(model)
    return {"total_params": counts["total_parameters"], "active_params": counts["active_parameters"]}


def forward_flops_per_token(config: MoEConfig, seq_len: int, training: bool = False) -> int:
    """Forward FLOPs (2 per multiply-add) per token of the implemented model, counted analytically.

    Counts every matmul the code runs for one token: attention projections, attention scores and values (the mean
    causal context `(seq_len + 1) / 2`), dense blocks, the gate (`x W_g`, and `x W_noise` in training; the
    hierarchical router computes every group's secondary logits), the `experts_per_token` experts and the LM head.
    Norms, softmaxes and the embedding lookup are left out, as the paper's ops/timestep does.
    """
    d = config.hidden_size
    head_dim = config.head_dim or d // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    attention = d * q_out + 2 * d * kv_out + q_out * d + 2 * q_out * (seq_len + 1) / 2
    ffn_factor = 3 if config.expert_activation == "swiglu" else 2
    dense = ffn_factor * d * config.intermediate_size
    expert = ffn_factor * d * config.expert_intermediate_size
    if config.router_type == "hierarchical":
        gate_outputs = config.num_expert_groups + config.num_experts
    else:
        gate_outputs = config.num_experts
    noisy = config.router_type in ("noisy_top_k", "hierarchical") and training
    gate = d * gate_outputs * (2 if noisy else 1)
    macs = 0.0
    moe = set(config.moe_layer_indices)
    for layer in range(config.num_hidden_layers):
        macs += attention
        macs += gate + config.experts_per_token * expert if layer in moe else dense
    macs += d * config.vocab_size
    return int(round(2 * macs))


def _batch_starts(length: int, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    if length <= seq_len:
        raise ValueError(f"The train split has {length} bytes, not more than one window of seq_len={seq_len}.")
    return torch.randint(0, length - seq_len, (batch_size,), generator=generator)


def validation_batches(corpus: Corpus, settings: TrainSettings) -> list[torch.Tensor]:
    """Fixed, non-overlapping validation windows, `eval_batches` batches of `(batch_size, seq_len)` at most."""
    data = corpus.validation.long()
    num_windows = min(data.numel() // settings.seq_len, settings.eval_batches * settings.batch_size)
    if num_windows < 1:
        raise ValueError(f"The validation split has {data.numel()} bytes, fewer than seq_len={settings.seq_len}.")
    # Spread the windows over the whole split (every file has a chance), in a fixed order.
    stride = data.numel() // num_windows
    starts = torch.arange(num_windows) * stride
    windows = torch.stack([data[s : s + settings.seq_len] for s in starts.tolist()])
    return list(windows.split(settings.batch_size))


def _learning_rate(settings: TrainSettings, step: int) -> float:
    if step < settings.warmup_steps:
        return settings.learning_rate * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.learning_rate * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate(
    model: MoEForCausalLM, batches: list[torch.Tensor], noisy_statistics: bool = False, noise_seed: int = 0
) -> dict[str, float]:
    """Validation perplexity per byte and, per MoE layer, the expert statistics over all validation tokens.

    Returns `val_loss`, `val_ppl` and, when the model has MoE layers, `cv_importance`, `cv_load`, `max_mean_load`
    (mean over the MoE layers; the per-layer values are under `layers`), measured in evaluation mode (no gate noise,
    so Load is the number of tokens each expert receives). With `noisy_statistics`, a second pass routes the same
    tokens as in training (gate noise on, seeded with `noise_seed`, no gradient) and adds `noisy_cv_importance`,
    `noisy_cv_load` and `noisy_max_mean_load`, computed from the tokens each expert actually received (how balanced
    the experts are under the routing the balancing losses were trained with), and `noisy_val_ppl`.
    """
    was_training = model.training
    model.eval()
    model.expert_statistics.reset()
    total_loss = total_tokens = 0.0
    for batch in batches:
        out = model(input_ids=batch, labels=batch)
        tokens = batch.numel() - batch.size(0)  # each row predicts seq_len - 1 next bytes
        total_loss += float(out.lm_loss) * tokens
        total_tokens += tokens
    statistics = model.pop_expert_statistics()
    model.train(was_training)
    val_loss = total_loss / total_tokens
    result: dict = {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
    layers = model.config.moe_layer_indices
    if layers:
        per_layer = {
            layer: {name: statistics[f"layer_{layer}/{name}"] for name in ("cv_importance", "cv_load", "max_mean_load")}
            for layer in layers
        }
        result["layers"] = per_layer
        for name in ("cv_importance", "cv_load", "max_mean_load"):
            result[name] = sum(values[name] for values in per_layer.values()) / len(per_layer)
        if noisy_statistics:
            result.update(_noisy_statistics(model, batches, noise_seed))
    return result


@torch.no_grad()
def _noisy_statistics(model: MoEForCausalLM, batches: list[torch.Tensor], noise_seed: int) -> dict[str, float]:
    """Perplexity, CV(Importance), CV(Load) and max/mean Load over `batches` with the training-time (noisy) routing.

    Load here is the count of tokens each expert received (not the smooth estimate), so it compares with the
    evaluation-mode Load. Averaged over the MoE layers; the global random state is left as it was.
    """
    was_training = model.training
    model.train()
    model.expert_statistics.reset()
    total_loss = total_tokens = 0.0
    with torch.random.fork_rng():
        torch.manual_seed(noise_seed)
        for batch in batches:
            out = model(input_ids=batch, labels=batch)
            tokens = batch.numel() - batch.size(0)
            total_loss += float(out.lm_loss) * tokens
            total_tokens += tokens
    importance = model.expert_statistics.importance
    counts = model.expert_statistics.tokens_per_expert
    model.expert_statistics.reset()
    model.train(was_training)
    totals = {"noisy_cv_importance": 0.0, "noisy_cv_load": 0.0, "noisy_max_mean_load": 0.0}
    for layer_importance, layer_counts in zip(importance, counts, strict=True):
        totals["noisy_cv_importance"] += float(cv_squared(layer_importance).sqrt())
        totals["noisy_cv_load"] += float(cv_squared(layer_counts).sqrt())
        totals["noisy_max_mean_load"] += float(layer_counts.max() / layer_counts.mean())
    result = {name: value / len(counts) for name, value in totals.items()}
    result["noisy_val_ppl"] = math.exp(total_loss / total_tokens)
    return result


@dataclass
class RunResult:
    name: str
    config: dict
    metrics: dict
    train_tokens: int
    train_seconds: float
    tokens_per_second: float
    total_params: int
    active_params: int
    flops_per_token: int
    final_train_lm_loss: float

    def to_dict(self) -> dict:
        return asdict(self)


def train_and_evaluate(
    name: str,
    config: MoEConfig,
    corpus: Corpus,
    settings: TrainSettings,
    log: Callable[[str], object] = print,
    noisy_statistics: bool = False,
) -> RunResult:
    """Train `config` from scratch on the corpus with `settings`, then evaluate it on the validation windows.

    The model's initialization is seeded with `settings.seed`, the data order with `settings.data_seed`, so two calls
    with different configs see the same tokens. Tokens/s is measured over the training steps after the first
    `warmup_steps // 2` (compile-free warm-up of the allocator and kernels), on the training wall clock.
    """
    torch.manual_seed(settings.seed)
    model = MoEForCausalLM(config)
    if config.moe_layer_indices and settings.experts_implementation:
        model.set_experts_implementation(settings.experts_implementation)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    data = corpus.train.long()
    data_generator = torch.Generator().manual_seed(settings.data_seed)
    # The noise of the noisy gates comes from the global generator, reseeded so runs are repeatable.
    torch.manual_seed(settings.seed + 1)
    skip = min(settings.warmup_steps // 2, settings.steps - 1)
    timed_start = None
    lm_loss_ema = None
    start = time.perf_counter()
    for step in range(settings.steps):
        if step == skip:
            timed_start = time.perf_counter()
        starts = _batch_starts(data.numel(), settings.seq_len, settings.batch_size, data_generator)
        batch = torch.stack([data[s : s + settings.seq_len] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, step)
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_loss = float(out.lm_loss.detach())
        if not math.isfinite(lm_loss):
            raise FloatingPointError(f"{name}: training loss became {lm_loss} at step {step}.")
        lm_loss_ema = lm_loss if lm_loss_ema is None else 0.9 * lm_loss_ema + 0.1 * lm_loss
        if log is not None and settings.log_every and (step + 1) % settings.log_every == 0:
            elapsed = time.perf_counter() - start
            log(
                f"  [{name}] step {step + 1}/{settings.steps} lm_loss {lm_loss:.4f} aux {float(out.aux_loss.detach()):.4f} "
                f"({elapsed:.0f}s)"
            )
    end = time.perf_counter()
    timed_steps = settings.steps - skip
    tokens_per_second = timed_steps * settings.tokens_per_step / max(end - timed_start, 1e-9)
    metrics = evaluate(model, validation_batches(corpus, settings), noisy_statistics, noise_seed=settings.seed)
    counts = parameter_counts(model)
    return RunResult(
        name=name,
        config={k: v for k, v in config.to_dict().items() if not k.startswith("_")},
        metrics=metrics,
        train_tokens=settings.steps * settings.tokens_per_step,
        train_seconds=end - start,
        tokens_per_second=tokens_per_second,
        total_params=counts["total_params"],
        active_params=counts["active_params"],
        flops_per_token=forward_flops_per_token(config, settings.seq_len),
        final_train_lm_loss=float(lm_loss_ema),
    )


def machine_description() -> str:
    import platform

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


RESULTS_DIR = "docs/results"  # the committed results of the full runs
QUICK_RESULTS_DIR = "runs/reproduction-quick"  # a smoke test never overwrites them


def add_common_arguments(parser: argparse.ArgumentParser, script_defaults: dict | None = None) -> None:
    """Command-line options shared by the reproduction scripts (the model and budget of `TrainSettings`)."""
    defaults = TrainSettings(**(script_defaults or {}))
    parser.add_argument(
        "--output_dir",
        default=None,
        help=f"Where the table, JSON (and plot) go (default {RESULTS_DIR}, or {QUICK_RESULTS_DIR} with --quick).",
    )
    parser.add_argument("--quick", action="store_true", help="Tiny settings: a smoke test that runs in seconds.")
    parser.add_argument("--steps", type=int, default=None, help=f"Training steps per model (default {defaults.steps}).")
    parser.add_argument("--batch_size", type=int, default=None, help=f"Sequences per step ({defaults.batch_size}).")
    parser.add_argument("--seq_len", type=int, default=None, help=f"Bytes per sequence ({defaults.seq_len}).")
    parser.add_argument("--hidden_size", type=int, default=None, help=f"Model width ({defaults.hidden_size}).")
    parser.add_argument(
        "--expert_intermediate_size",
        type=int,
        default=None,
        help=f"Expert hidden size ({defaults.expert_intermediate_size}).",
    )
    parser.add_argument(
        "--learning_rate", type=float, default=None, help=f"Peak AdamW rate ({defaults.learning_rate})."
    )
    parser.add_argument("--eval_batches", type=int, default=None, help=f"Validation batches ({defaults.eval_batches}).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of model initialization and gate noise.")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: robust when the cores are shared)."
    )
    parser.add_argument("--max_corpus_bytes", type=int, default=None, help="Read at most this many corpus bytes.")


QUICK_SETTINGS = dict(
    hidden_size=32,
    num_attention_heads=2,
    expert_intermediate_size=16,
    seq_len=32,
    batch_size=4,
    steps=3,
    warmup_steps=1,
    eval_batches=2,
    log_every=0,
)
QUICK_CORPUS_BYTES = 400_000


def settings_from_args(
    args: argparse.Namespace, script_defaults: dict | None = None
) -> tuple[TrainSettings, int | None]:
    """`TrainSettings` (`TrainSettings` defaults updated with the script's, or the quick ones) with the command line's
    overrides, and the corpus limit. Resolves the default `args.output_dir`."""
    values = dict(QUICK_SETTINGS) if args.quick else dict(script_defaults or {})
    for name in ("steps", "batch_size", "seq_len", "hidden_size", "expert_intermediate_size", "learning_rate"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.eval_batches is not None:
        values["eval_batches"] = args.eval_batches
    values["seed"] = args.seed
    if args.threads < 1:
        raise ValueError(f"`--threads` must be a positive integer, got {args.threads!r}.")
    settings = TrainSettings(**values)
    if args.output_dir is None:
        args.output_dir = QUICK_RESULTS_DIR if args.quick else RESULTS_DIR
    check_output_dir(args.output_dir)  # before the models train, not when the results are written
    torch.set_num_threads(args.threads)
    max_bytes = (
        args.max_corpus_bytes if args.max_corpus_bytes is not None else (QUICK_CORPUS_BYTES if args.quick else None)
    )
    return settings, max_bytes


def format_number(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


__all__ = [
    "Corpus",
    "add_common_arguments",
    "settings_from_args",
    "RunResult",
    "TrainSettings",
    "evaluate",
    "forward_flops_per_token",
    "is_validation_file",
    "load_corpus",
    "machine_description",
    "model_config",
    "parameter_counts",
    "stdlib_source_files",
    "train_and_evaluate",
    "validation_batches",
    "write_atomically",
]
