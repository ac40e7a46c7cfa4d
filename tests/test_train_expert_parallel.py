"""`scripts/train.py --expert_parallel 2` (issue 5): the training CLI on 2 CPU processes over gloo (torchrun).

The 2-rank run is compared with the same CLI in one process on the same global batch (2 ranks x 2 blocks = 4 blocks
of the same seeded shuffle; softmax top-k router, so no gate noise differs between the runs): same tokenizer, same
losses, same evaluation numbers, same final weights; its single checkpoint reloads in one process with the logits
behind the evaluation it reported; and a single-process checkpoint fine-tuned on 2 ranks (learning rate 0) evaluates
as in one process and saves back unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modeling_moe import MoEConfig, MoEForCausalLM
from modeling_moe.cli import train as moe_train
from modeling_moe.training.data import default_corpus, tokenize_and_pack

from .test_training import TINY as TRAINING_TINY

REPO = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
BLOCK_SIZE, EVAL_BLOCKS, STEPS = 32, 8, 4
LAUNCH_TIMEOUT_S = 150
TINY = {**TRAINING_TINY, "router_type": "softmax_top_k"}
SHARD_LOG = re.compile(r"expert parallel: rank (\d+) of (\d+) holds local expert weights (\{.*\})")


def cli_args(output_dir: Path, per_device_batch: int, **overrides) -> list[str]:
    args = {
        "output_dir": output_dir,
        "report_to": "none",
        "disable_tqdm": "true",
        "per_device_train_batch_size": per_device_batch,
        "per_device_eval_batch_size": 2,
        "logging_steps": 1,
        "learning_rate": "3e-3",
        "save_strategy": "no",
        "sample_max_new_tokens": 4,
        "block_size": BLOCK_SIZE,
        "max_eval_samples": EVAL_BLOCKS,
        "max_steps": STEPS,
        "seed": 0,
        "tokenizer_train_max_chars": 60000,
        "use_cpu": "true",
        **overrides,
    }
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_ranks(args: list[str], cwd: Path) -> str:
    """`torchrun --nproc_per_node 2 scripts/train.py ARGS --expert_parallel 2` (as the README launches it); its output."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}"]
    command += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "--monitor_interval=0.1"]
    command += [str(REPO / "scripts" / "train.py"), *args, "--expert_parallel", str(WORLD_SIZE)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, cwd=cwd)
    if result.returncode != 0:
        pytest.fail(f"2-rank run failed (exit {result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    print(f"2-rank --expert_parallel 2 run: {time.monotonic() - start:.1f} s")
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-rank run from scratch and the single-process reference."""
    root = tmp_path_factory.mktemp("train_ep")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    ep_dir = root / "ep"
    # --dry_run: the Hub export needs the whole model, rank 0 writes it from the gathered checkpoint.
    output = launch_two_ranks(["--config", str(config), *cli_args(ep_dir, 2), "--dry_run"], root)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = moe_train.run(["--config", str(config), *cli_args(root / "single", WORLD_SIZE * 2)])
    finally:
        torch.set_num_threads(threads)
    return ep_dir, output, root / "single", single


def _history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_each_rank_holds_half_of_the_experts(runs):
    ep_dir, output, _, _ = runs
    full = {name: param.shape for name, param in MoEForCausalLM.from_pretrained(ep_dir).named_parameters()}
    shards = {int(rank): json.loads(shapes) for rank, world, shapes in SHARD_LOG.findall(output) if world == "2"}
    assert sorted(shards) == [0, 1], output[-3000:]
    for rank, shapes in shards.items():
        # ReLU experts: up_proj and down_proj of both MoE layers.
        assert len(shapes) == 2 * TINY["num_hidden_layers"], shapes
        for name, local in shapes.items():
            assert local[0] == TINY["num_experts"] // WORLD_SIZE, (rank, name, local)
            assert local[1:] == list(full[name][1:]) and full[name][0] == TINY["num_experts"], name


def test_two_rank_run_follows_single_process_run(runs):
    ep_dir, _, single_dir, single = runs
    ep_history, single_history = _history(ep_dir), single["log_history"]
    for key in ("loss", "lm_loss", "importance_loss", "load_loss"):
        ep_values = [entry[key] for entry in ep_history if "loss" in entry]
        single_values = [entry[key] for entry in single_history if "loss" in entry]
        assert len(ep_values) == len(single_values) == STEPS, key
        deviation = max(abs(a - b) for a, b in zip(ep_values, single_values, strict=True))
        print(f"{key}: 2 ranks {[round(v, 4) for v in ep_values]}, max deviation from 1 process {deviation:.1e}")
        assert deviation < 1e-4, (key, ep_values, single_values)
    ep_losses = [entry["loss"] for entry in ep_history if "loss" in entry]
    assert ep_losses[-1] < ep_losses[0]  # it trains
    # Rank 0 trained the BPE tokenizer every rank used, as the single process did.
    assert (ep_dir / "tokenizer.json").read_text() == (single_dir / "tokenizer.json").read_text()
    # Evaluation over both ranks' shards of the validation blocks = the single-process evaluation.
    ep_eval = next(entry for entry in ep_history if "eval_nll" in entry)
    assert ep_eval["eval_accuracy"] == pytest.approx(single["metrics"]["eval_accuracy"], abs=1e-6)
    assert ep_eval["eval_nll"] == pytest.approx(single["metrics"]["eval_nll"], abs=1e-5)
    # The balance statistics too: evaluation's cover both ranks' blocks (they once were rank 0's half alone), and
    # training's stay those of the global batch.
    single_eval = next(entry for entry in single_history if "eval_nll" in entry)
    ep_train, single_train = (
        [entry for entry in history if "loss" in entry] for history in (ep_history, single_history)
    )
    balance = [key for key in single_eval if key.startswith("eval_layer_") or key.endswith("importance_loss")]
    assert len(balance) == 1 + 3 * len(MoEConfig(**TINY).moe_layer_indices), balance
    for key in balance:
        assert ep_eval[key] == pytest.approx(single_eval[key], abs=1e-5), key
    for ep_entry, single_entry in zip(ep_train, single_train, strict=True):
        for key in (key for key in single_entry if key.startswith("layer_")):
            assert ep_entry[key] == pytest.approx(single_entry[key], abs=1e-5), key
    # Final weights, gathered into one checkpoint.
    ep_state = MoEForCausalLM.from_pretrained(ep_dir).state_dict()
    single_state = MoEForCausalLM.from_pretrained(single_dir).state_dict()
    assert ep_state.keys() == single_state.keys()
    deviation = max((ep_state[key] - value).abs().max().item() for key, value in single_state.items())
    print(f"final weights after {STEPS} steps, 2 ranks vs 1 process: max deviation {deviation:.1e}")
    for key, value in single_state.items():
        assert torch.allclose(ep_state[key], value, atol=1e-5, rtol=0), key


def test_checkpoint_loads_in_one_process_with_the_reported_logits(runs):
    ep_dir, output, _, _ = runs
    names = {path.name for path in ep_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "all_results.json", "hub_export"} <= names
    assert not names & {".ep-init", ".tmp-save-ep"} and not list(ep_dir.glob("_fsdp*.py"))
    assert json.loads((ep_dir / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_moe.MoEForCausalLM"
    )
    model = MoEForCausalLM.from_pretrained(ep_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ep_dir)
    # The validation blocks the run evaluated on, and their next-token NLL from this single-process model's logits.
    blocks = tokenize_and_pack(default_corpus(), tokenizer, "text", BLOCK_SIZE)["validation"]
    input_ids = torch.tensor(blocks[:EVAL_BLOCKS]["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
    reported = json.loads((ep_dir / "all_results.json").read_text())
    assert float(nll) == pytest.approx(reported["eval_nll"], abs=1e-5)
    assert math.exp(float(nll)) == pytest.approx(reported["eval_perplexity"], rel=1e-4)
    # It generates, and rank 0 printed its sample.
    prompt = tokenizer("def ", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    assert output.count("Sample ('def ', sampled):") == 1
    assert (ep_dir / "hub_export" / "model.safetensors").is_file()


def test_fine_tuning_loads_a_single_process_checkpoint_into_two_ranks(runs, tmp_path):
    """`--model_name_or_path` of the single-process run, learning rate 0: the 2-rank run must evaluate the same model
    (same NLL as that run reported) and save it back unchanged."""
    _, _, single_dir, single = runs
    overrides = {"learning_rate": 0, "max_steps": 1, "sample_max_new_tokens": 0}
    launch_two_ranks(["--model_name_or_path", str(single_dir), *cli_args(tmp_path / "ft", 2, **overrides)], tmp_path)
    reported = json.loads((tmp_path / "ft" / "all_results.json").read_text())
    # Evaluation over both ranks' shards of the validation blocks = the single-process evaluation of the same model.
    assert reported["eval_accuracy"] == pytest.approx(single["metrics"]["eval_accuracy"], abs=1e-6)
    assert reported["eval_nll"] == pytest.approx(single["metrics"]["eval_nll"], abs=1e-5)
    print(
        f"eval_nll of the same model: 2 ranks {reported['eval_nll']:.6f}, 1 process {single['metrics']['eval_nll']:.6f}"
    )
    source = MoEForCausalLM.from_pretrained(single_dir).state_dict()
    saved = MoEForCausalLM.from_pretrained(tmp_path / "ft").state_dict()
    assert saved.keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(saved[key], value), key


def test_two_nodes_of_one_process_each_finish_cleanly(tmp_path):
    """Two "nodes" (two torchrun agents on 127.0.0.1, one process each): rank 1 is its node's first process, so
    Trainer's `should_log` holds there too, but it has no single-process copy of the model; the run once trained,
    saved, then failed on rank 1 with `AttributeError: 'NoneType' object has no attribute 'config'` (exit status 1).
    Its one step is not a logging step (`logging_steps` 2): the expert-load history gets it at the end of training,
    with both ranks' tokens (it once held rank 0's alone)."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    overrides = {"max_steps": 1, "logging_steps": 2, "sample_max_new_tokens": 0, "skip_eval": "true"}
    args = ["--config", str(config), *cli_args(tmp_path / "out", 2, **overrides), "--expert_parallel", str(WORLD_SIZE)]
    port = free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1"]
            + ["--master_addr=127.0.0.1", f"--master_port={port}", "--monitor_interval=0.1"]
            + [str(REPO / "scripts" / "train.py"), *args],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]
    assert "".join(outputs).count("output_dir: ") == 1  # the summary, printed by rank 0 only
    assert MoEForCausalLM.from_pretrained(tmp_path / "out").config.num_experts == TINY["num_experts"]
    (entry,) = json.loads((tmp_path / "out" / "expert_load_history.json").read_text())
    tokens = WORLD_SIZE * 2 * BLOCK_SIZE  # one step of 2 blocks per rank
    assert entry["step"] == 1
    assert [sum(layer) for layer in entry["tokens_per_expert"]] == [TINY["num_experts_per_tok"] * tokens] * 2


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--expert_parallel", "2", "--lora"], "does not support --lora"),
        (["--expert_parallel", "2", "--resume_from_checkpoint", "true"], "does not support --resume_from_checkpoint"),
        (  # Trainer loaded the best checkpoint's plain tensors into the sharded model, failing after all the training
            ["--expert_parallel", "2", "--eval_strategy", "steps", "--save_strategy", "steps"]
            + ["--load_best_model_at_end", "true"],
            "does not support --load_best_model_at_end",
        ),
        (["--expert_parallel", "2"], "needs 2 processes .* single process"),
        (["--expert_parallel", "0"], "positive integer, got 0"),
    ],
)
def test_expert_parallel_bad_input_fails_early(tmp_path, extra, match):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    source = ["--config", str(config)]
    if "--lora" in extra:  # LoRA fine-tunes a saved model (its config is all the early checks read)
        MoEConfig(**TINY).save_pretrained(tmp_path / "saved")
        source = ["--model_name_or_path", str(tmp_path / "saved")]
    with pytest.raises(ValueError, match=match):
        moe_train.run([*source, *cli_args(tmp_path / "out", 2), *extra])
    assert not (tmp_path / "out").exists()  # rejected before anything was written


@pytest.mark.parametrize("use_cpu", [True, False])
def test_expert_parallel_joins_the_group_on_the_device_trainer_uses(tmp_path, monkeypatch, use_cpu):
    """`--use_cpu` reaches `init_distributed`: Trainer then keeps the model on the CPU, and a GPU machine's nccl group
    would take none of its collectives' tensors."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    argv = ["--config", str(config), *cli_args(tmp_path / "out", 2, use_cpu=str(use_cpu).lower())]
    model_args, _, run_args, training_args = moe_train.parse_args([*argv, "--expert_parallel", "2"])
    joined = []
    monkeypatch.setattr(moe_train, "init_distributed", lambda timeout_s, **kwargs: joined.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert moe_train.setup_expert_parallel(model_args, run_args, training_args, dict(TINY)) == 2
    assert joined == [{"use_cpu": use_cpu}]
