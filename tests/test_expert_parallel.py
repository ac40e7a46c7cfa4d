"""Expert parallelism (SPEC §6) and global balancing statistics (SPEC §3) on 2 CPU processes over gloo.

Each multi-process check launches this file under `torchrun` (static rendezvous on 127.0.0.1, a free port, a bounded
wall time); the worker half of the file is at the bottom (`python tests/test_expert_parallel.py SCENARIO WORKDIR`).
The references are single-process runs in the pytest process, on the same global batch.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from modeling_moe import MoEConfig, MoEForCausalLM, expert_parallel
from modeling_moe.expert_parallel import expert_parallel_config, validate_expert_parallel_size
from modeling_moe.gating import reduce_router_statistics

WORLD_SIZE = 2
GLOBAL_BATCH, SEQ_LEN, VOCAB = 4, 8, 64
TRAIN_STEPS = 20
LAUNCH_TIMEOUT_S = 120


# Checkpoints of the 2-rank comparisons: name -> (config overrides, mode of the compared forward). The noisy gate is
# compared in training with the same noise on both sides (`FixedNoise`); the hierarchical router (SwiGLU experts, so
# the `gate_up_proj` rule is exercised too) in eval mode, where it adds no noise but still reduces its statistics.
CHECKPOINTS = {
    "softmax_top_k": ({"router_type": "softmax_top_k"}, "train"),
    "noisy_top_k": ({"router_type": "noisy_top_k"}, "train"),
    "hierarchical_swiglu": (
        {
            "router_type": "hierarchical",
            "num_expert_groups": 2,
            "num_experts": 8,
            "num_groups_per_tok": 2,  # both groups, 2 of the 4 experts in each (k > 1 at both levels: gradients)
            "num_experts_per_tok": 2,
            "expert_activation": "swiglu",
        },
        "eval",
    ),
}


def tiny_config(router_type: str, expert_activation: str = "relu", **overrides) -> MoEConfig:
    # Layer 0 dense, layer 1 MoE: the plan must shard only the experts.
    defaults = {"num_experts": 4, "num_experts_per_tok": 2, "moe_layers": [1], "hidden_size": 16}
    overrides = {"expert_intermediate_size": 8, **defaults, **overrides}
    return MoEConfig(
        vocab_size=VOCAB,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        expert_activation=expert_activation,
        router_type=router_type,
        **overrides,
    )


def make_checkpoint(path: Path, router_type: str, **overrides) -> None:
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config(router_type, **overrides))
    with torch.no_grad():  # non-zero gates, so routing depends on the token and gradients reach both gate matrices
        for name, param in model.named_parameters():
            if ".mlp.gate." in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, labels; rows 0 and 2 end in padding, so each rank's half has the same token count."""
    input_ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -3:] = 0
    attention_mask[2, -3:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def gate_noise() -> torch.Tensor:
    """The eps ~ N(0, 1) of SPEC §2 for every token of the global batch, shared by both sides of the comparison."""
    return torch.randn(GLOBAL_BATCH * SEQ_LEN, 4, generator=torch.Generator().manual_seed(2))


class FixedNoise:
    """Replaces `torch.randn_like` in the gate by fixed rows of `gate_noise()` (this process's tokens)."""

    def __init__(self, rows: slice):
        self.noise = gate_noise()[rows]
        self.original = torch.randn_like

    def __enter__(self):
        torch.randn_like = lambda tensor: self.noise.to(tensor.dtype).clone()
        return self

    def __exit__(self, *exc):
        torch.randn_like = self.original


# The fused-experts check under FSDP2: every layer MoE, 3 SGD steps, a batch long enough that the experts on each rank
# take unequal numbers of rows.
FUSED_CHECKPOINT, FUSED_STEPS, FUSED_SEQ_LEN = "all_moe_fused", 3, 64


def fused_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, FUSED_SEQ_LEN), generator=torch.Generator().manual_seed(6))


def train_dataset() -> list[dict[str, torch.Tensor]]:
    # The same global batch at every step, so the loss falls visibly within 20 steps.
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(3))
    ids = ids.repeat(TRAIN_STEPS, 1)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def training_arguments(output_dir: Path, per_device_batch: int, **extra):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device_batch,
        max_steps=TRAIN_STEPS,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The workers run with OMP_NUM_THREADS=1; on 2 shared cores the single-process references are also far faster so.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ACCELERATE_CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ep_cpu.yaml"


def launch(
    scenario: str, workdir: Path, timeout_s: float = LAUNCH_TIMEOUT_S, launcher: str = "torchrun"
) -> tuple[subprocess.CompletedProcess, float]:
    """Run the worker on 2 processes with `torchrun` or with `accelerate launch` and the shipped CPU config."""
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}"]
        command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "--monitor_interval=0.1"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", f"--config_file={ACCELERATE_CPU_CONFIG}"]
        command += [f"--main_process_port={free_port()}", "--monitor_interval=0.1"]
    command += [__file__, scenario, str(workdir)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    return result, time.monotonic() - start


# ----------------------------------------------------------------------------------------------------------------------
# Single process
# ----------------------------------------------------------------------------------------------------------------------


def test_expert_parallel_plan_names_only_existing_expert_weights():
    for activation, up in (("relu", "up_proj"), ("swiglu", "gate_up_proj")):
        model = MoEForCausalLM(tiny_config("noisy_top_k", activation))
        plan = model.config.base_model_ep_plan
        assert plan == {
            f"layers.*.mlp.experts.{up}": "grouped_gemm",
            "layers.*.mlp.experts.down_proj": "grouped_gemm",
            "layers.*.mlp.experts": "ep_dispatch_experts",
        }
        from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

        names = {replace_layer_number_by_wildcard(n) for n, _ in model.model.named_modules()}
        names |= {replace_layer_number_by_wildcard(n) for n, _ in model.model.named_parameters()}
        assert set(plan) <= names  # every rule matches (no "match nothing" warning)
        assert "layers.*.mlp.up_proj.weight" in names  # the dense layer's weights are not named by the plan


def test_expert_parallel_config_validation():
    config = expert_parallel_config(2, num_experts=4, world_size=2)
    assert (config.ep_size, config.fsdp_size, config.tp_size) == (2, 2, 1)
    assert expert_parallel_config(1, num_experts=4, world_size=1) is None
    with pytest.raises(ValueError, match="must divide `num_experts` \\(6\\)"):
        validate_expert_parallel_size(4, num_experts=6, world_size=4)
    with pytest.raises(ValueError, match="must divide the number of processes \\(world size 4\\)"):
        validate_expert_parallel_size(3, num_experts=6, world_size=4)
    with pytest.raises(ValueError, match="single process"):
        validate_expert_parallel_size(2, num_experts=4, world_size=1)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        validate_expert_parallel_size(0, num_experts=4, world_size=2)
    with pytest.raises(ValueError, match="`router_statistics_scope` must be one of .*got 'batch'"):
        MoEConfig(router_statistics_scope="batch")


@pytest.mark.parametrize("size", [0, -2, "2"])
def test_bad_expert_parallel_size_is_named_before_joining_a_process_group(tmp_path, monkeypatch, size):
    monkeypatch.setattr(
        expert_parallel, "init_distributed", lambda *a, **k: pytest.fail("joined a process group for a bad size")
    )
    config = tiny_config("softmax_top_k")
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"`expert_parallel` must be a positive integer, got {size!r}"):
        expert_parallel.from_config_expert_parallel(config, size, tmp_path / "init")
    with pytest.raises(ValueError, match=f"`expert_parallel` must be a positive integer, got {size!r}"):
        expert_parallel.from_pretrained_expert_parallel(tmp_path, size)


def test_expert_parallel_load_reads_the_config_where_it_reads_the_weights(tmp_path, monkeypatch):
    """The config comes from the same place as the weights: a checkpoint in a `subfolder` loads (the config was once
    read from the top folder, without the Hub location arguments), and `revision`/`cache_dir`/`token` reach the config
    read as they reach the model load (a Hub id at a revision would otherwise read main's config)."""
    torch.manual_seed(0)
    saved = MoEForCausalLM(tiny_config("noisy_top_k", num_experts=6))
    saved.save_pretrained(tmp_path / "sub")
    model = expert_parallel.from_pretrained_expert_parallel(tmp_path, 1, subfolder="sub")
    assert model.config.num_experts == 6
    torch.testing.assert_close(model.state_dict(), saved.state_dict(), rtol=0, atol=0)

    config_reads = []
    real_read = MoEConfig.from_pretrained.__func__

    def recording_read(cls, path, **kwargs):
        config_reads.append(kwargs)
        return real_read(cls, tmp_path / "sub")

    monkeypatch.setattr(MoEConfig, "from_pretrained", classmethod(recording_read))
    location = {"revision": "v1", "cache_dir": str(tmp_path / "cache"), "token": "hf_x", "local_files_only": True}
    with pytest.raises(OSError):  # no such Hub repo offline; the config read has already been recorded
        expert_parallel.from_pretrained_expert_parallel("user/no-such-moe", 1, dtype=torch.float32, **location)
    assert config_reads == [location]


def test_fused_experts_backward_when_saved_weights_come_back_in_other_memory():
    """The weights `moe_fused` saves can come back in backward in other memory: FSDP2 frees the gathered parameters
    after forward and gathers them again, and saved-tensor hooks (offloading) unpack copies. Here each comes back in
    the memory the other weight had in forward, deterministically: the fused backward once read its forward-time
    overflow weight copies, keyed by address, for the wrong weight (seen as run-to-run gradients on 2 ranks)."""
    from modeling_moe.fast_experts import fused_experts_forward
    from modeling_moe.modeling_moe import MoEExperts

    num_experts, hidden, num_tokens = 4, 16, 70
    experts = MoEExperts(tiny_config("softmax_top_k", hidden_size=hidden, expert_intermediate_size=hidden))
    memory = torch.randn(2, num_experts, hidden, hidden, generator=torch.Generator().manual_seed(5)) * 0.3
    experts.up_proj, experts.down_proj = nn.Parameter(memory[0]), nn.Parameter(memory[1])  # same shape and strides
    # Expert 0 takes far more rows than the others (the fused path once copied the weights of such experts).
    token = torch.arange(num_tokens)
    top_k_index = torch.stack([torch.where(token < 64, 0, 1), 1 + token % 3], dim=-1)
    hidden_states = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(6))
    top_k_weights = torch.rand(num_tokens, 2, generator=torch.Generator().manual_seed(7))
    probe = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(8))  # d loss / d output

    def run(implementation) -> list[torch.Tensor]:
        inputs = [hidden_states.clone().requires_grad_(), top_k_weights.clone().requires_grad_()]
        (implementation(experts, inputs[0], top_k_index, inputs[1]) * probe).sum().backward()
        grads = [inputs[0].grad, inputs[1].grad, experts.up_proj.grad, experts.down_proj.grad]
        experts.zero_grad(set_to_none=True)
        return grads

    reference = run(lambda module, *args: module(*args))  # eager

    def pack(tensor: torch.Tensor):
        for slot, weight in enumerate((experts.up_proj, experts.down_proj)):
            if tensor.data_ptr() == weight.data_ptr() and tensor.shape == weight.shape:
                return slot, tensor.detach().clone()
        return None, tensor

    def unpack(packed) -> torch.Tensor:
        slot, tensor = packed
        if slot is None:
            return tensor
        with torch.no_grad():  # back in the memory the *other* weight had in forward
            return memory[1 - slot].copy_(tensor)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        measured = run(fused_experts_forward)
    assert memory[0].data_ptr() != memory[1].data_ptr()
    for name, got, want in zip(
        ("hidden_states", "top_k_weights", "up_proj", "down_proj"), measured, reference, strict=True
    ):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), name  # gradients up to ~15 here


def test_reduce_router_statistics_is_identity_without_process_group():
    importance = torch.rand(4, requires_grad=True)
    load = torch.rand(4)
    out = reduce_router_statistics(importance, load, scope="global")
    assert out[0] is importance and out[1] is load
    with pytest.raises(ValueError, match="got 'world'"):
        reduce_router_statistics(importance, load, scope="world")


# ----------------------------------------------------------------------------------------------------------------------
# 2 ranks: the worker writes what it measured, the tests compare it with single-process references
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("expert_parallel")
    for name, (overrides, _) in CHECKPOINTS.items():
        make_checkpoint(workdir / name, **overrides)
    make_checkpoint(
        workdir / FUSED_CHECKPOINT,
        "softmax_top_k",
        moe_layers="all",
        num_experts=8,
        hidden_size=64,
        expert_intermediate_size=64,
    )
    result, _ = launch("main", workdir)
    if result.returncode != 0:
        pytest.fail(f"2-rank run failed (exit {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return workdir


def single_process_step(workdir: Path, name: str) -> dict:
    """Reference: one forward/backward on the global batch, then the same SGD step the worker takes."""
    model = MoEForCausalLM.from_pretrained(workdir / name)
    input_ids, attention_mask, labels = global_batch()
    model.eval()
    with torch.no_grad():
        logits_before = model(input_ids=input_ids, attention_mask=attention_mask).logits
    model.train(CHECKPOINTS[name][1] == "train")
    with FixedNoise(slice(None)):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 0.1 * param.grad
    return {
        "loss": out.loss.detach(),
        "aux_loss": out.aux_loss.detach(),
        "importance": out.router_outputs[0].importance,
        "load": out.router_outputs[0].load,
        "grads": grads,
        "logits_before": logits_before,
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
    }


@pytest.mark.parametrize("router_type", list(CHECKPOINTS))
def test_two_ranks_match_single_process_loss_and_every_gradient(ep_run, router_type):
    reference = single_process_step(ep_run, router_type)
    measured = torch.load(ep_run / f"{router_type}_rank0.pt")
    assert torch.allclose(measured["loss"], reference["loss"], atol=1e-5, rtol=0)
    # Global statistics (SPEC §3): each rank's balancing loss is the one of the whole batch.
    for rank in range(WORLD_SIZE):
        rank_result = torch.load(ep_run / f"{router_type}_rank{rank}.pt")
        assert torch.allclose(rank_result["aux_loss"], reference["aux_loss"], atol=1e-6, rtol=0)
        assert torch.allclose(rank_result["importance"], reference["importance"], atol=1e-5, rtol=0)
        assert torch.allclose(rank_result["load"], reference["load"], atol=1e-5, rtol=0)
    assert reference["aux_loss"] > 0
    # Parameters without a gradient (W_noise in eval mode) have none, or a zero one under FSDP, on 2 ranks.
    assert set(reference["grads"]) <= set(measured["grads"])
    for name in set(measured["grads"]) - set(reference["grads"]):
        assert not measured["grads"][name].any(), name
    kinds = {"dense": 0, "gate": 0, "expert": 0}
    for name, grad in reference["grads"].items():
        assert torch.allclose(measured["grads"][name], grad, atol=1e-5, rtol=0), name
        kind = "expert" if ".experts." in name else "gate" if ".mlp.gate." in name else "dense"
        kinds[kind] += 1
        if kind != "dense" or "mlp" in name:
            assert grad.abs().max() > 0, name  # the comparison is not between zeros
    expected_gates = {"softmax_top_k": 1, "noisy_top_k": 2, "hierarchical_swiglu": 2}[router_type]  # W_g (and W_noise)
    assert kinds["gate"] == expected_gates and kinds["expert"] == 2


def test_fused_experts_two_ranks_match_single_process_over_training_steps(ep_run):
    """`moe_fused` experts on 2 ranks, every layer MoE: each step's loss and gradients are the single process's.

    Regression: the fused backward once reused weight copies cached in forward under the weights' `data_ptr()`, but
    FSDP2 gathers the parameters again into new memory before backward, so another weight could sit at a cached
    address: gradients below the last MoE layer then changed from run to run.
    """
    model = MoEForCausalLM.from_pretrained(ep_run / FUSED_CHECKPOINT, experts_implementation="eager").train()
    input_ids = fused_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    measured = torch.load(ep_run / "fused_steps.pt")
    assert sorted(measured["steps"]) == list(range(FUSED_STEPS))
    for step in range(FUSED_STEPS):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        assert torch.allclose(measured["steps"][step]["loss"], loss.detach(), atol=1e-5, rtol=0), step
        grads = measured["steps"][step]["grads"]
        assert {name for name, param in model.named_parameters() if param.grad is not None} == set(grads)
        assert sum(".experts." in name for name in grads) == 4  # both layers' expert weights
        for name, param in model.named_parameters():
            if param.grad is not None:
                assert torch.allclose(grads[name], param.grad, atol=1e-5, rtol=0), (step, name)
        optimizer.step()
        optimizer.zero_grad()


def test_router_statistics_scope_global_or_local(ep_run):
    model = MoEForCausalLM.from_pretrained(ep_run / "softmax_top_k").train()
    input_ids, attention_mask, _ = global_batch()
    half = GLOBAL_BATCH // WORLD_SIZE
    with torch.no_grad():
        global_aux = model(input_ids=input_ids, attention_mask=attention_mask).aux_loss
        local_aux = [
            model(
                input_ids=input_ids[r * half : (r + 1) * half], attention_mask=attention_mask[r * half : (r + 1) * half]
            ).aux_loss
            for r in range(WORLD_SIZE)
        ]
    for rank in range(WORLD_SIZE):
        measured = torch.load(ep_run / f"scopes_rank{rank}.pt")
        assert torch.allclose(measured["global"], global_aux, atol=1e-6, rtol=0)
        assert torch.allclose(measured["local"], local_aux[rank], atol=1e-6, rtol=0)
        # The losses a reentrant-checkpointed forward returns (and Trainer logs) are the global batch's too (they once
        # were each rank's own: the first forward runs without autograd, where the statistics stayed local).
        assert torch.allclose(measured["global, reentrant checkpointing"], global_aux, atol=1e-6, rtol=0)
    assert not torch.allclose(local_aux[0], global_aux, atol=1e-3)  # the two scopes are distinguishable here


def test_training_from_scratch_shards_rank_0s_initialization(ep_run):
    initialized = MoEForCausalLM.from_pretrained(ep_run / "from_config_init").state_dict()
    gathered = MoEForCausalLM.from_pretrained(ep_run / "from_config_saved").state_dict()
    assert initialized.keys() == gathered.keys()
    for key, value in initialized.items():
        assert torch.equal(gathered[key], value), key


def test_each_rank_holds_its_share_of_the_experts(ep_run):
    for rank in range(WORLD_SIZE):
        shapes = json.loads((ep_run / f"local_shapes_rank{rank}.json").read_text())
        assert shapes == {
            "model.layers.1.mlp.experts.up_proj": [2, 8, 16],  # 4 experts / 2 ranks
            "model.layers.1.mlp.experts.down_proj": [2, 16, 8],
        }


@pytest.mark.parametrize("router_type", list(CHECKPOINTS))
def test_checkpoints_move_between_expert_parallel_and_single_process(ep_run, router_type):
    reference = single_process_step(ep_run, router_type)
    measured = torch.load(ep_run / f"{router_type}_rank0.pt")
    input_ids, attention_mask, _ = global_batch()
    # Single-process checkpoint -> 2 ranks: same logits as the single process.
    assert torch.allclose(measured["logits_before"], reference["logits_before"], atol=1e-6, rtol=0)
    # 2 ranks (after one step) -> one ordinary checkpoint, loaded in a single process: the stepped weights...
    saved = ep_run / f"{router_type}_ep_saved"
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("_fsdp*.py"))
    assert json.loads((saved / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_moe.MoEForCausalLM"
    )
    reloaded = MoEForCausalLM.from_pretrained(saved).eval()
    for key, value in reference["state_dict"].items():
        assert torch.allclose(reloaded.state_dict()[key], value, atol=1e-6, rtol=0), key
    # ...and the logits the 2-rank model computed after the step.
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.allclose(measured["logits_after"], logits, atol=1e-6, rtol=0)


def test_trainer_on_two_ranks_follows_single_process_losses(ep_run, tmp_path):
    from transformers import Trainer

    model = MoEForCausalLM.from_pretrained(ep_run / "softmax_top_k")
    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path, per_device_batch=GLOBAL_BATCH),
        train_dataset=train_dataset(),
    )
    trainer.train()
    reference = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    measured = json.loads((ep_run / "trainer_losses.json").read_text())
    assert len(reference) == len(measured) == TRAIN_STEPS
    assert reference[-1] < reference[0] - 0.5  # it trains
    deviation = max(abs(a - b) for a, b in zip(measured, reference, strict=True))
    print(f"20-step Trainer losses, 2 ranks vs 1 process: max deviation {deviation:.2e}")
    assert deviation < 1e-4, (measured, reference)


# ----------------------------------------------------------------------------------------------------------------------
# Failure: a dead rank stops the run
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("failure", "launcher"), [("killed", "accelerate"), ("stuck", "torchrun")])
def test_a_failed_rank_stops_the_others_with_a_clear_error(tmp_path, failure, launcher):
    make_checkpoint(tmp_path / "softmax_top_k", "softmax_top_k")
    bound_s = 60
    # subprocess.TimeoutExpired (a test failure) if the run hangs past the bound.
    result, elapsed = launch(failure, tmp_path, timeout_s=bound_s, launcher=launcher)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert elapsed < bound_s
    assert "ChildFailedError" in output
    root_cause = output.split("Root Cause (first observed failure):")[-1]
    if failure == "killed":
        # The survivor fails in its next collective (gloo: connection reset by peer) or is stopped by torchrun, which
        # names the rank that died and how.
        assert "rank      : 1 (local_rank: 1)" in root_cause and "Signal 9 (SIGKILL)" in root_cause
    else:
        # The stuck rank is alive: the other one's collective times out (`init_distributed(timeout_s=5)`) and raises.
        assert "Timed out waiting 5000ms" in output
        assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 1" in root_cause
    assert "reached step 2" in output  # the failure happened mid-training, after collectives had succeeded


# ----------------------------------------------------------------------------------------------------------------------
# Worker (runs under torchrun)
# ----------------------------------------------------------------------------------------------------------------------


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _worker_main(workdir: Path) -> None:
    import torch.distributed as dist
    from transformers import Trainer

    from modeling_moe.expert_parallel import (
        EXPERT_PARALLEL_TRAINING_ARGS,
        from_config_expert_parallel,
        from_pretrained_expert_parallel,
        init_distributed,
        local_expert_parameters,
    )

    init_distributed(timeout_s=60)
    rank = dist.get_rank()
    rows = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
    token_rows = slice(rows.start * SEQ_LEN, rows.stop * SEQ_LEN)
    input_ids, attention_mask, labels = (t[rows] for t in global_batch())

    # Replicated model (plain data parallelism): the balancing losses with global and with local statistics.
    aux_by_scope = {}
    for scope in ("global", "local"):
        plain = MoEForCausalLM.from_pretrained(workdir / "softmax_top_k", router_statistics_scope=scope).train()
        aux_by_scope[scope] = plain(input_ids=input_ids, attention_mask=attention_mask).aux_loss.detach()
    # Reentrant gradient checkpointing runs the layers' first forward without autograd (and again in backward).
    plain = MoEForCausalLM.from_pretrained(workdir / "softmax_top_k").train()
    plain.activation_checkpointing_enable({"use_reentrant": True})
    out = plain(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    aux_by_scope["global, reentrant checkpointing"] = out.aux_loss.detach()
    torch.save(aux_by_scope, workdir / f"scopes_rank{rank}.pt")

    model = from_pretrained_expert_parallel(workdir / "softmax_top_k", WORLD_SIZE)
    shapes = {name: list(shape) for name, shape in local_expert_parameters(model).items()}
    (workdir / f"local_shapes_rank{rank}.json").write_text(json.dumps(shapes))

    for router_type, (_, mode) in CHECKPOINTS.items():
        if router_type != "softmax_top_k":
            model = from_pretrained_expert_parallel(workdir / router_type, WORLD_SIZE)
        model.eval()
        with torch.no_grad():
            logits_before = _gather_rows(model(input_ids=input_ids, attention_mask=attention_mask).logits)
        model.train(mode == "train")
        with FixedNoise(token_rows):
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads[name] = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is not None:
                    param -= 0.1 * param.grad
        model.save_pretrained(workdir / f"{router_type}_ep_saved")
        model.eval()
        with torch.no_grad():
            logits_after = _gather_rows(model(input_ids=input_ids, attention_mask=attention_mask).logits)
        result = {
            "loss": loss / WORLD_SIZE,
            "aux_loss": out.aux_loss.detach(),
            "importance": out.router_outputs[0].importance,
            "load": out.router_outputs[0].load,
            "grads": grads,
            "logits_before": logits_before,
            "logits_after": logits_after,
        }
        torch.save(result, workdir / f"{router_type}_rank{rank}.pt")

    # Fused experts, every layer MoE: loss and gradients of 3 SGD steps (see the test for why).
    model = from_pretrained_expert_parallel(workdir / FUSED_CHECKPOINT, WORLD_SIZE, experts_implementation="moe_fused")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = {}
    for step in range(FUSED_STEPS):
        out = model(input_ids=fused_batch()[rows], labels=fused_batch()[rows])
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        grads = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads[name] = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad.clone()
        steps[step] = {"loss": loss / WORLD_SIZE, "grads": grads}
        optimizer.step()
        optimizer.zero_grad()
    if rank == 0:
        torch.save({"steps": steps}, workdir / "fused_steps.pt")

    # Training from scratch: rank 0 initializes, every rank loads its shard.
    torch.manual_seed(rank)  # different seeds: the ranks must still end up with rank 0's weights
    model = from_config_expert_parallel(tiny_config("noisy_top_k"), WORLD_SIZE, workdir / "from_config_init")
    model.save_pretrained(workdir / "from_config_saved")

    model = from_pretrained_expert_parallel(workdir / "softmax_top_k", WORLD_SIZE)
    args = training_arguments(
        workdir / "trainer", per_device_batch=GLOBAL_BATCH // WORLD_SIZE, **EXPERT_PARALLEL_TRAINING_ARGS
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset())
    trainer.train()
    if rank == 0:
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        (workdir / "trainer_losses.json").write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()


def _worker_failure(workdir: Path, failure: str) -> None:
    import torch.distributed as dist

    from modeling_moe.expert_parallel import from_pretrained_expert_parallel

    model = from_pretrained_expert_parallel(workdir / "softmax_top_k", WORLD_SIZE, timeout_s=5)
    rank = dist.get_rank()
    input_ids, _, labels = (t[rank * 2 : rank * 2 + 2] for t in global_batch())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(1000):
        if rank == 0 and step == 2:
            print("reached step 2", flush=True)
        if rank == 1 and step == 3:
            if failure == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)  # stuck: alive but never joins the next collective
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"rank {rank} still alive after 1000 steps", flush=True)


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    if scenario == "main":
        _worker_main(directory)
    else:
        _worker_failure(directory, scenario)


def test_process_group_backend_follows_where_the_model_runs(monkeypatch):
    """nccl (after `torch.cuda.set_device(LOCAL_RANK)`, so that each rank's communicator and barrier use its own GPU)
    where CUDA is available; gloo with `use_cpu` (Trainer's `--use_cpu`, which keeps the model on the CPU even there:
    nccl takes no CPU tensor) or `ACCELERATE_USE_CPU=1`."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append(("init", backend)))
    for name, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
        "LOCAL_RANK": "1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    expert_parallel.init_distributed()
    assert calls == [("set_device", 1), ("init", "nccl")]
    calls.clear()
    expert_parallel.init_distributed(use_cpu=True)
    assert calls == [("init", "gloo")]
    calls.clear()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    expert_parallel.init_distributed()
    assert calls == [("init", "gloo")]
