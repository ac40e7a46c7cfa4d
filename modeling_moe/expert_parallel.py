"""Expert parallelism for [`MoEForCausalLM`] with the Transformers stack (SPEC §6).

The paper mixes data and model parallelism: dense layers and gates are replicated, each expert exists once, experts are
spread over the devices, and tokens travel to their expert and back. Transformers 5.x does this natively: a model
loaded with `from_pretrained(path, distributed_config=DistributedConfig(ep_size=N, fsdp_size=world_size))` reads
`MoEConfig.base_model_ep_plan`, splits every MoE layer's experts over `N` ranks (`grouped_gemm`), routes tokens to them
all-to-all (`ep_dispatch_experts`), and shards the dense parameters with FSDP2 over all ranks (data parallel: each rank
computes on its own batch with the full dense weights). `Trainer` trains such a model as it is. This module holds the
few pieces a training script needs around that: the `DistributedConfig`, checks with clear errors, a process group with
a bounded timeout (so a dead or stuck rank makes the others fail instead of hang), and the loading call.

Launch (one process per device): `torchrun --nproc_per_node N script.py ...` on CPU (gloo; set `ACCELERATE_USE_CPU=1`
so Trainer does not look for an accelerator) or `accelerate launch --config_file configs/accelerate/ep_2gpu.yaml
script.py ...` on GPUs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers.distributed import DistributedConfig

from .configuration_moe import MoEConfig
from .modeling_moe import MoEForCausalLM

# A collective that waits longer than this raises on every rank still alive (see `init_distributed`).
DEFAULT_TIMEOUT_S = 600.0

# `from_pretrained` keyword arguments that say where the checkpoint is; the config is read from the same place.
_CHECKPOINT_LOCATION_KWARGS = (
    "cache_dir",
    "force_download",
    "local_files_only",
    "proxies",
    "revision",
    "subfolder",
    "token",
)

# Trainer arguments for a model sharded at load time: Trainer cannot checkpoint the optimizer of such a model (it
# raises otherwise), and `ddp_timeout` bounds the process group if Trainer is the one that creates it.
EXPERT_PARALLEL_TRAINING_ARGS = {"save_only_model": True, "ddp_timeout": int(DEFAULT_TIMEOUT_S)}


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_expert_parallel_size(expert_parallel_size: int, num_experts: int, world_size: int | None = None) -> None:
    """Raise a clear `ValueError` when `expert_parallel_size` cannot shard `num_experts` experts over `world_size`."""
    world_size = _world_size() if world_size is None else world_size
    if isinstance(expert_parallel_size, bool) or not isinstance(expert_parallel_size, int) or expert_parallel_size < 1:
        raise ValueError(f"`expert_parallel` must be a positive integer, got {expert_parallel_size!r}.")
    if expert_parallel_size == 1:
        return
    if world_size == 1:
        raise ValueError(
            f"`expert_parallel={expert_parallel_size}` needs {expert_parallel_size} processes (or a multiple), but "
            "this is a single process (WORLD_SIZE=1). Launch with `torchrun --nproc_per_node "
            f"{expert_parallel_size} ...` or `accelerate launch --num_processes {expert_parallel_size} ...`."
        )
    if world_size % expert_parallel_size != 0:
        raise ValueError(
            f"`expert_parallel={expert_parallel_size}` must divide the number of processes (world size {world_size})."
        )
    if num_experts % expert_parallel_size != 0:
        raise ValueError(
            f"`expert_parallel={expert_parallel_size}` must divide `num_experts` ({num_experts}): each rank holds "
            "the same number of whole experts."
        )


def expert_parallel_config(
    expert_parallel_size: int, num_experts: int | None = None, world_size: int | None = None
) -> DistributedConfig | None:
    """The `DistributedConfig` that shards the experts over `expert_parallel_size` ranks; `None` for `1` (no EP).

    Every rank holds its own batch (`fsdp_size = world_size`: dense weights FSDP2-sharded, data parallel); the experts
    are split over groups of `expert_parallel_size` ranks, and replicated `world_size / expert_parallel_size` times.
    """
    world_size = _world_size() if world_size is None else world_size
    if num_experts is not None:
        validate_expert_parallel_size(expert_parallel_size, num_experts, world_size)
    elif (
        isinstance(expert_parallel_size, bool) or not isinstance(expert_parallel_size, int) or expert_parallel_size < 1
    ):
        raise ValueError(f"`expert_parallel` must be a positive integer, got {expert_parallel_size!r}.")
    if expert_parallel_size == 1:
        return None
    return DistributedConfig(ep_size=expert_parallel_size, fsdp_size=world_size)


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, use_cpu: bool = False) -> None:
    """Join the process group of a `torchrun` / `accelerate launch` run, with a bounded collective timeout.

    gloo on CPU (or when `ACCELERATE_USE_CPU=1`, or `use_cpu`: Trainer's `--use_cpu`, which keeps the model on the CPU
    even where CUDA is available), nccl on CUDA. A no-op when the group already exists. Without it,
    Transformers creates the group itself with a two-hour timeout, so a stuck rank would hold the others for hours; with
    it, every collective that waits more than `timeout_s` raises on the ranks still alive. (A rank that dies outright
    closes its connections, which makes gloo raise at once, and the launcher then stops the whole group.)
    """
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"Expert parallelism runs one process per device under a launcher, but {', '.join(missing)} is not set. "
            "Launch with `torchrun --nproc_per_node N ...` (CPU: prefix `ACCELERATE_USE_CPU=1`) or `accelerate launch "
            "--config_file configs/accelerate/ep_2gpu.yaml ...`."
        )
    use_cpu = (
        use_cpu
        or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )
    if not use_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="gloo" if use_cpu else "nccl", timeout=timedelta(seconds=timeout_s))


def _restore_remote_code_identity(model: MoEForCausalLM, model_class: type[MoEForCausalLM]) -> None:
    """Give FSDP2's wrapper class the name and module of the model class it wraps.

    `fully_shard` turns the model into an instance of a class `FSDP<Name>` defined in a torch module, and
    `save_pretrained` of a remote-code model (this package registers its classes for `trust_remote_code`) writes that
    class into `config.json`'s `auto_map` and copies torch's FSDP source files into the checkpoint (Transformers 5.23
    strips the `FSDP` prefix from `architectures` but not there). Renaming the wrapper class keeps the checkpoint an
    ordinary one. Behaviour is unchanged: the class and its bases stay the same objects.
    """
    wrapper_class = type(model)
    if wrapper_class is not model_class and wrapper_class.__name__ == f"FSDP{model_class.__name__}":
        wrapper_class.__module__ = model_class.__module__
        wrapper_class.__name__ = model_class.__name__
        wrapper_class.__qualname__ = model_class.__qualname__


def from_pretrained_expert_parallel(
    pretrained_model_name_or_path: str | os.PathLike,
    expert_parallel_size: int,
    model_class: type[MoEForCausalLM] = MoEForCausalLM,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs,
) -> MoEForCausalLM:
    """Load a checkpoint (an ordinary single-process one) with its experts sharded over `expert_parallel_size` ranks.

    Every rank of the run must call it. `kwargs` go to `from_pretrained` (e.g. `dtype`). With
    `expert_parallel_size=1` it is a plain `from_pretrained`. The returned model trains with `Trainer` (pass
    `EXPERT_PARALLEL_TRAINING_ARGS`) and `save_pretrained` writes one ordinary checkpoint, gathered on rank 0, that
    loads in a single process; call it on every rank.
    """
    config = kwargs.pop("config", None)
    if config is None:
        location = {key: kwargs[key] for key in _CHECKPOINT_LOCATION_KWARGS if key in kwargs}
        config = model_class.config_class.from_pretrained(pretrained_model_name_or_path, **location)
    validate_expert_parallel_size(expert_parallel_size, config.num_experts)  # before joining any process group
    if expert_parallel_size == 1:
        return model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    init_distributed(timeout_s)
    distributed_config = expert_parallel_config(expert_parallel_size, num_experts=config.num_experts)
    model = model_class.from_pretrained(
        pretrained_model_name_or_path, config=config, distributed_config=distributed_config, **kwargs
    )
    _restore_remote_code_identity(model, model_class)
    return model


def from_config_expert_parallel(
    config: MoEConfig,
    expert_parallel_size: int,
    init_dir: str | os.PathLike,
    model_class: type[MoEForCausalLM] = MoEForCausalLM,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **kwargs,
) -> MoEForCausalLM:
    """A freshly initialized model (training from scratch) with its experts sharded over `expert_parallel_size` ranks.

    Sharding happens at load time, so rank 0 initializes the model once (under the caller's seed) and writes it to
    `init_dir` (a folder every rank can read: on several machines, a shared file system), then every rank loads it.
    Every rank of the run must call it.
    """
    validate_expert_parallel_size(expert_parallel_size, config.num_experts)  # before joining any process group
    if expert_parallel_size == 1:
        return model_class(config)
    init_distributed(timeout_s)
    if dist.get_rank() == 0:
        model_class(config).save_pretrained(init_dir)
    dist.barrier()
    return from_pretrained_expert_parallel(init_dir, expert_parallel_size, model_class, timeout_s, **kwargs)


def local_expert_parameters(model: torch.nn.Module) -> dict[str, torch.Size]:
    """The shape of this rank's part of every expert weight (`(num_experts / ep_size, ...)` under expert parallelism)."""
    shapes = {}
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:
            local = param.to_local() if hasattr(param, "to_local") else param
            shapes[name] = local.shape
    return shapes


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EXPERT_PARALLEL_TRAINING_ARGS",
    "expert_parallel_config",
    "from_config_expert_parallel",
    "from_pretrained_expert_parallel",
    "init_distributed",
    "local_expert_parameters",
    "validate_expert_parallel_size",
]
