"""End-to-end tests of moe-train / moe-eval / moe-push on tiny settings (a few steps each, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from modeling_moe import MoEConfig, MoEForCausalLM
from modeling_moe.cli import evaluate as moe_eval
from modeling_moe.cli import push_to_hub as moe_push
from modeling_moe.cli import train as moe_train
from modeling_moe.cli.cpu_malloc import GLIBC, REUSING, allocator_name
from modeling_moe.training.arguments import check_config_fields
from modeling_moe.training.data import default_corpus_documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 32,
    "vocab_size": 320,
}


def common_args(output_dir, **overrides) -> list[str]:
    args = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "disable_tqdm": "true",
        "per_device_train_batch_size": "4",
        "per_device_eval_batch_size": "8",
        "logging_steps": "1",
        "learning_rate": "3e-3",
        "save_strategy": "no",
        "sample_max_new_tokens": "4",
        "block_size": "32",
        "max_eval_samples": "8",
        "max_steps": "4",
        "use_cpu": "true",
        "seed": "0",
        "tokenizer_train_max_chars": "60000",
    }
    args.update({k: str(v) for k, v in overrides.items()})
    return [item for key, value in args.items() for item in (f"--{key}", value)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    documents = default_corpus_documents()
    (root / "train.txt").write_text("\n".join(documents[:60]))
    (root / "valid.txt").write_text("\n".join(documents[60:70]))
    return root


@pytest.fixture(scope="module")
def scratch_run(workdir):
    """From scratch on the embedded corpus, with the Hub dry run."""
    out = workdir / "scratch"
    result = moe_train.run(
        ["--config", str(workdir / "tiny.json"), "--dry_run", *common_args(out, max_steps=6, report_to="tensorboard")]
    )
    return out, result


def test_from_scratch_logs_balance_and_heatmap(scratch_run):
    out, result = scratch_run
    model = MoEForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(json.load(open(out / "tokenizer.json"))["model"]["vocab"])
    train_logs = [h for h in result["log_history"] if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(1, 7))
    for log in train_logs:
        for key in ("lm_loss", "importance_loss", "load_loss"):
            assert math.isfinite(log[key])
        for layer in model.config.moe_layer_indices:
            for stat in ("cv_importance", "cv_load", "max_mean_load"):
                assert f"layer_{layer}/{stat}" in log
            assert log[f"layer_{layer}/max_mean_load"] >= 1.0 - 1e-6
        # Total loss = LM loss + balancing losses (same forwards, no gradient accumulation).
        assert log["loss"] == pytest.approx(log["lm_loss"] + log["importance_loss"] + log["load_loss"], rel=1e-4)
    eval_log = [h for h in result["log_history"] if "eval_loss" in h][-1]
    assert all(f"eval_layer_{i}/cv_load" in eval_log for i in model.config.moe_layer_indices)
    heatmap = out / "expert_load_heatmap.png"
    assert heatmap.stat().st_size > 1000 and heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.load(open(out / "expert_load_history.json"))
    assert len(history) == 6 and len(history[0]["tokens_per_expert"]) == len(model.config.moe_layer_indices)
    # k experts per token: each log's counts sum to k * tokens of the logged step(s) (4 blocks of 32 per step).
    assert sum(history[0]["tokens_per_expert"][0]) == 2 * 4 * 32
    assert result["sample"].startswith("def ")
    # The same statistics reach TensorBoard (`--report_to tensorboard`).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = list((out / "runs").iterdir())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for layer in model.config.moe_layer_indices:
        assert {f"train/layer_{layer}/cv_load", f"eval/layer_{layer}/cv_importance"} <= tags
    assert {"train/lm_loss", "train/importance_loss", "train/load_loss"} <= tags


def test_label_smoothing_keeps_the_balancing_losses(tmp_path):
    # With `--label_smoothing_factor`, Trainer would compute the loss from the logits alone and drop the importance and
    # load losses (SPEC §3); moe-train's Trainer smooths the model's LM loss instead, whose loss keeps them.
    from transformers import TrainingArguments
    from transformers.trainer_pt_utils import LabelSmoother

    from modeling_moe.training.evaluation import build_trainer

    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(**TINY)).eval()
    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    trainer, _ = build_trainer(model, args, tokenizer=None)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    counted = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        outputs = model(input_ids=ids)
        assert outputs.aux_loss > 0
        # Alone, and as one micro-batch of an accumulated step of 40 labels (its balancing losses weighted by its share).
        for num_items_in_batch, share in ((None, 1.0), (torch.tensor(40), counted / 40)):
            loss = trainer.compute_loss(
                model, {"input_ids": ids, "labels": labels}, num_items_in_batch=num_items_in_batch
            )
            smoothed = LabelSmoother(0.1)(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)
            torch.testing.assert_close(loss, smoothed + outputs.aux_loss * share)


def test_cpu_training_keeps_freed_memory(scratch_run):
    # tests/test_cpu_malloc.py measures what it does; here: moe-train does it by default on a CPU
    _, result = scratch_run
    assert result["cpu_malloc"] == (REUSING if allocator_name() == GLIBC else f"left as is: {allocator_name()}")


def test_eval_metrics_match_independent_computation(scratch_run, tmp_path):
    """Perplexity and accuracy of the run equal a plain re-computation on the same validation blocks."""
    out, result = scratch_run
    metrics = result["metrics"]
    from transformers import AutoTokenizer

    from modeling_moe.training.data import default_corpus, tokenize_and_pack

    tokenizer = AutoTokenizer.from_pretrained(out)
    blocks = tokenize_and_pack(default_corpus(), tokenizer, "text", 32)["validation"].select(range(8))
    model = MoEForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor(blocks["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    targets = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).double().mean()
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy.item(), abs=1e-9)
    saved = json.load(open(out / "all_results.json"))
    assert saved["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"])
    counts = saved["total_parameters"], saved["active_parameters"]
    assert counts[0] == sum(p.numel() for p in model.parameters())
    # Active: all but the n - k experts a token does not use, in each MoE layer (ReLU experts: up and down matrices).
    config = model.config
    unused_experts = len(config.moe_layer_indices) * (config.num_experts - config.experts_per_token)
    assert counts[1] == counts[0] - unused_experts * 2 * config.hidden_size * config.expert_intermediate_size

    # moe-eval on the saved folder reproduces the same numbers.
    evaluation = moe_eval.run(
        ["--model_name_or_path", str(out), "--block_size", "32", "--max_eval_samples", "8", "--use_cpu", "true"]
    )
    evaluated = evaluation["metrics"]
    # on a CPU it keeps freed memory for the next batches, as moe-train does
    assert evaluation["cpu_malloc"] == (REUSING if allocator_name() == GLIBC else f"left as is: {allocator_name()}")
    left_alone = moe_eval.run(
        ["--model_name_or_path", str(out), "--block_size", "32", "--max_eval_samples", "8", "--use_cpu", "true"]
        + ["--sample_max_new_tokens", "0", "--reuse_freed_memory", "false", "--output_dir", str(tmp_path)]
    )
    assert left_alone["cpu_malloc"] is None and left_alone["metrics"]["eval_loss"] == evaluated["eval_loss"]
    assert json.load(open(tmp_path / "eval_results.json")) == left_alone["metrics"]  # --output_dir
    assert evaluated["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"], rel=1e-5)
    assert evaluated["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])


def test_eval_sample_follows_its_seed_as_moe_train_does(scratch_run):
    # moe-eval's `--seed` seeds its sample: with the run's seed (0) it is the sample moe-train printed for the model.
    out, result = scratch_run
    args = ["--model_name_or_path", str(out), "--block_size", "32", "--max_eval_samples", "1", "--use_cpu", "true"]
    args += ["--sample_max_new_tokens", "4"]
    assert moe_eval.run([*args, "--seed", "0"])["sample"] == result["sample"]
    from transformers import AutoTokenizer

    model, tokenizer = MoEForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    expected = moe_train.generate_sample(model, tokenizer, "def ", 4, seed=1)
    assert expected != result["sample"]
    assert moe_eval.run([*args, "--seed", "1"])["sample"] == expected


def test_model_card_carries_run_numbers(scratch_run):
    from huggingface_hub import ModelCard

    out, result = scratch_run
    metrics = result["metrics"]
    hub = out / "hub_export"
    card = ModelCard.load(hub / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert "mixture-of-experts" in data["tags"]
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["perplexity"] == pytest.approx(metrics["eval_perplexity"], rel=1e-3)
    assert values["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-4)
    cv_load = np.mean([metrics[f"eval_layer_{i}/cv_load"] for i in range(2)])
    assert values["cv_load"] == pytest.approx(cv_load, abs=1e-4)
    assert data["moe"]["num_experts"] == 4 and data["moe"]["num_experts_per_tok"] == 2
    assert data["moe"]["total_parameters"] == metrics["total_parameters"]
    assert data["moe"]["active_parameters"] == metrics["active_parameters"]
    assert f"{metrics['total_parameters']:,}" in card.text and "**2 of 4**" in card.text
    assert "(6 steps)" in card.text  # the steps trained (max_steps=6)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "modeling_moe.py", "configuration_moe.py"):
        assert (hub / name).is_file(), name
    # The template shipped in the package is the repository's top-level hub_card.md.
    with open(os.path.join(REPO, "hub_card.md")) as a, open(os.path.join(REPO, "modeling_moe", "hub_card.md")) as b:
        assert a.read() == b.read()


def test_exported_folder_loads_without_package(scratch_run, tmp_path):
    out, _ = scratch_run
    folder = tmp_path / "exported"
    shutil.copytree(out / "hub_export", folder)
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        assert importlib.util.find_spec("modeling_moe") is None, "package must be hidden"
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained({str(folder)!r})
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = tok("def ", return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 5
        print("OK", type(model).__name__)
        """
    )
    # -I: isolated mode (no cwd / PYTHONPATH / user site); the editable install's finder is hidden by a bare site dir.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower() "
        "and 'editable' not in repr(f).lower()]; sys.path[:] = [p for p in sys.path if '__editable__' not in p "
        f"and p != {REPO!r}]\n" + script
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK MoEForCausalLM" in proc.stdout


def test_finetune_from_saved_folder(scratch_run, workdir):
    out, _ = scratch_run
    ft = workdir / "finetuned"
    result = moe_train.run(
        [
            "--model_name_or_path",
            str(out),
            "--train_file",
            str(workdir / "train.txt"),
            "--validation_file",
            str(workdir / "valid.txt"),
            *common_args(ft, max_steps=2, sample_max_new_tokens=0, reuse_freed_memory="false"),
        ]
    )
    assert result["cpu_malloc"] is None  # --reuse_freed_memory false: the malloc is left alone
    base = MoEForCausalLM.from_pretrained(out)
    tuned = MoEForCausalLM.from_pretrained(ft)
    assert tuned.config.vocab_size == base.config.vocab_size  # the saved tokenizer was reused
    assert not torch.equal(base.lm_head.weight, tuned.lm_head.weight)
    assert math.isfinite(result["metrics"]["eval_perplexity"])


def test_a_trained_models_config_json_serves_as_config(scratch_run):
    out, _ = scratch_run
    saved = json.loads((out / "config.json").read_text())
    assert "auto_map" in saved  # written by save_pretrained for the remote code
    fields = check_config_fields(saved, MoEConfig, "`config`")
    trained = MoEForCausalLM.from_pretrained(out).config.to_dict()
    fresh = MoEConfig(**fields).to_dict()
    where = ("_name_or_path", "auto_map")  # the folder it was loaded from, its remote code
    assert {k: v for k, v in fresh.items() if k not in where} == {k: v for k, v in trained.items() if k not in where}


def test_lora_with_merge(scratch_run, workdir):
    from peft import PeftModel

    out, _ = scratch_run
    lora_dir = workdir / "lora"
    args = ["--model_name_or_path", str(out), "--train_file", str(workdir / "train.txt"), "--lora", "--merge"]
    result = moe_train.run([*args, "--lora_r", "4", *common_args(lora_dir, max_steps=3, learning_rate=0.05)])
    assert (lora_dir / "adapter_config.json").is_file() and not (lora_dir / "config.json").exists()
    adapter_config = json.load(open(lora_dir / "adapter_config.json"))
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(adapter_config["target_parameters"]) == {"mlp.experts.up_proj", "mlp.experts.down_proj"}

    merged = MoEForCausalLM.from_pretrained(lora_dir / "merged").eval()
    assert type(merged) is MoEForCausalLM
    # The reported (and carded) size is the merged model's, not the base plus the adapters' tensors.
    assert result["metrics"]["total_parameters"] == sum(p.numel() for p in merged.parameters())
    base = MoEForCausalLM.from_pretrained(out).eval()
    layer = "model.layers.0.mlp.experts.up_proj"
    assert not torch.allclose(merged.state_dict()[layer], base.state_dict()[layer])  # experts were adapted
    reloaded = PeftModel.from_pretrained(MoEForCausalLM.from_pretrained(out), lora_dir).eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_resume_gives_identical_losses(workdir):
    data = ["--train_file", str(workdir / "train.txt"), "--config", str(workdir / "tiny.json"), "--skip_eval"]
    data += ["--config_overrides", "vocab_size=300"]  # also sizes the BPE trained from scratch
    settings = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "sample_max_new_tokens": 0}
    full = moe_train.run([*data, *common_args(workdir / "full", **settings)])
    resumed_dir = workdir / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(workdir / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = moe_train.run([*data, "--resume_from_checkpoint", "true", *common_args(resumed_dir, **settings)])

    def losses(result, start):
        return [
            (h["step"], h["loss"], h["lm_loss"]) for h in result["log_history"] if "loss" in h and h["step"] >= start
        ]

    assert [s for s, _, _ in losses(resumed, 3)] == [3, 4]
    assert losses(resumed, 3) == losses(full, 3)
    # And the same final weights, bit for bit (the last step's update included, which no logged loss shows).
    from safetensors.torch import load_file

    full_weights, resumed_weights = (load_file(d / "model.safetensors") for d in (workdir / "full", resumed_dir))
    assert full_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(full_weights[name], resumed_weights[name]) for name in full_weights)
    # The expert-load history (and heatmap) continues from the checkpoint instead of starting over.
    history = [json.load(open(d / "expert_load_history.json")) for d in (workdir / "full", resumed_dir)]
    assert [entry["step"] for entry in history[1]] == [entry["step"] for entry in history[0]] == [1, 2, 3, 4]
    assert history[1][:2] == history[0][:2]
    assert json.load(open(workdir / "full" / "config.json"))["vocab_size"] == 300
    # Resumed from a checkpoint in another folder: its history continues too.
    elsewhere_dir = workdir / "resumed_elsewhere"
    checkpoint = str(workdir / "full" / "checkpoint-2")
    elsewhere = moe_train.run([*data, "--resume_from_checkpoint", checkpoint, *common_args(elsewhere_dir, **settings)])
    assert losses(elsewhere, 3) == losses(full, 3)
    assert json.load(open(elsewhere_dir / "expert_load_history.json")) == history[1]


def test_failed_save_leaves_no_loadable_model(workdir, monkeypatch):
    out = workdir / "failed"

    def broken_save(self, output_dir=None, _internal_call=False):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(moe_train.Trainer, "save_model", broken_save)
    data = ["--train_file", str(workdir / "train.txt"), "--config", str(workdir / "tiny.json")]
    with pytest.raises(OSError, match="disk full"):
        moe_train.run([*data, *common_args(out, max_steps=1)])
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]
    with pytest.raises(OSError):
        MoEForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    "case, error, match",
    [
        ("missing", FileNotFoundError, "train_file"),
        ("empty", ValueError, "is empty"),
        ("unknown_field", ValueError, "num_expertz"),
        ("no_text_column", ValueError, "no 'text' column"),
        ("text_not_strings", TypeError, "The text column 'text' holds int64 values, not strings"),
        ("unwritable", PermissionError, "output_dir"),
    ],
)
def test_bad_input_errors(workdir, tmp_path, case, error, match):
    config = workdir / "tiny.json"
    train_file = workdir / "train.txt"
    out = tmp_path / "out"
    if case == "missing":
        train_file = tmp_path / "does_not_exist.txt"
    elif case == "empty":
        train_file = tmp_path / "empty.txt"
        train_file.write_text("")
    elif case == "unknown_field":
        config = tmp_path / "bad.json"
        config.write_text(json.dumps({**TINY, "num_expertz": 8}))
    elif case == "no_text_column":
        train_file = tmp_path / "rows.jsonl"
        train_file.write_text("\n".join(json.dumps({"id": i, "score": i / 2}) for i in range(20)))
    elif case == "text_not_strings":
        train_file = tmp_path / "numbers.jsonl"
        train_file.write_text("\n".join(json.dumps({"text": i}) for i in range(20)))
    elif case == "unwritable":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        out = blocker / "out"
    with pytest.raises(error, match=match):
        moe_train.run(["--config", str(config), "--train_file", str(train_file), *common_args(out)])


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ([], ValueError, "Pass exactly one of `--config`"),
        (["--config", "{config}", "--lora"], ValueError, "`--lora` fine-tunes adapters on a trained model"),
        (
            ["--model_name_or_path", "{saved}", "--merge"],
            ValueError,
            "`--merge` merges LoRA adapters: pass it together",
        ),
        (
            ["--model_name_or_path", "{saved}", "--config_overrides", "num_experts=2"],
            ValueError,
            "`config_overrides` only applies when training from scratch",
        ),
        (["--config", "{config}", "--config_overrides", "num_experts_per_tok=9"], ValueError, "num_experts_per_tok"),
        (["--config", "{bad_field}"], ValueError, "num_expertz"),
        (["--config", "{bad_yaml}"], ValueError, "is not valid YAML"),
        (["--config", "{config}", "--experts_implementation", "bogus"], ValueError, "got 'bogus'"),
        (["--config", "{config}", "--streaming", "--max_steps", "-1"], ValueError, "needs `--max_steps`"),
        (["--config", "{config}", "--block_size", "0"], ValueError, "`block_size` must be at least 2"),
        (["--config", "{config}", "--block_size", "128"], ValueError, "larger than the model's max_position"),
        (
            ["--model_name_or_path", "{saved}", "--block_size", "128"],
            ValueError,
            "larger than the model's max_position",
        ),
        (["--config", "{config}", "--max_train_samples", "0"], ValueError, "`max_train_samples` must be at least 1"),
        (["--model_name_or_path", "{saved}", "--do_eval"], ValueError, "--do_eval without `--do_train` asks for an"),
        (["--model_name_or_path", "{adapters}"], ValueError, "holds LoRA adapters .*their base model '/base'"),
        (["--model_name_or_path", "{adapters}", "--lora"], ValueError, "holds LoRA adapters"),
        (["--model_name_or_path", "{llama}"], ValueError, "holds a 'llama' model, not a sparsely-gated MoE"),
        (["--model_name_or_path", "{saved}", "--lora", "--lora_r", "0"], ValueError, "`lora_r` must be at least 1"),
        (["--model_name_or_path", "{saved}", "--lora", "--lora_dropout", "1.5"], ValueError, "`lora_dropout`"),
        (  # PEFT's LoRA on the expert weights (target_parameters) takes no dropout: once raised deep inside PEFT
            ["--model_name_or_path", "{saved}", "--lora", "--lora_dropout", "0.05"],
            ValueError,
            "`--lora_dropout 0.05` applies to the attention projections only.*`--lora_experts false`",
        ),
        (["--config", "{config}", "--tokenizer_vocab_size", "10"], ValueError, "`tokenizer_vocab_size` must be"),
        (["--config", "{config}", "--config_overrides", "vocab_size=100"], ValueError, "`vocab_size` 100"),
        (["--config", "{config}", "--validation_split_percentage", "0"], ValueError, "`validation_split_percentage`"),
        (
            ["--config", "{config}", "--per_device_eval_batch_size", "0"],
            ValueError,
            "`per_device_eval_batch_size` must be at least 1",
        ),
        (
            ["--config", "{config}", "--dry_run", "--hub_export_dir", "{blocker}/export"],
            PermissionError,
            "hub_export_dir",
        ),
        (["--config", "{config}", "--resume_from_checkpoint", "{tmp}"], FileNotFoundError, "not a checkpoint folder"),
        (["--config", "{config}", "--dry_run", "--hub_export_dir", "{out}"], ValueError, "would replace"),
        (
            ["--config", "{config}", "--dry_run", "--hub_export_dir", "{other}"],
            FileExistsError,
            "not an earlier export",
        ),
    ],
)
def test_argument_errors_come_before_any_data_is_loaded(workdir, tmp_path, monkeypatch, extra, error, match):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded before the bad argument was reported")

    monkeypatch.setattr(moe_train, "load_raw_datasets", no_data)
    (tmp_path / "bad.json").write_text(json.dumps({**TINY, "num_expertz": 8}))
    (tmp_path / "bad.yaml").write_text("hidden_size: [32\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/base"}))
    MoEConfig(**TINY).save_pretrained(tmp_path / "saved")
    LlamaConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path / "llama")
    (tmp_path / "other" / "notes.txt").write_text("mine")
    paths = {
        "config": workdir / "tiny.json",
        "bad_field": tmp_path / "bad.json",
        "bad_yaml": tmp_path / "bad.yaml",
        "tmp": tmp_path,
        "out": tmp_path / "out",
        "other": tmp_path / "other",
        "saved": tmp_path / "saved",
        "blocker": tmp_path / "a_file",
        "adapters": tmp_path / "adapters",
        "llama": tmp_path / "llama",
    }
    argv = [arg.format(**paths) for arg in extra]
    with pytest.raises(error, match=match):
        moe_train.run([*common_args(tmp_path / "out"), *argv])


def test_push_to_hub_creates_the_repo_before_training(workdir, tmp_path, monkeypatch):
    # As Trainer does at init: a missing token or network fails before any data is loaded or step trained.
    created = []

    def create_hub_repo(repo_id, token=None, private=None):
        created.append(repo_id)
        raise ConnectionError("no network")

    monkeypatch.setattr(moe_train, "create_hub_repo", create_hub_repo)
    monkeypatch.setattr(moe_train, "load_raw_datasets", lambda *a, **k: pytest.fail("data loaded before the repo"))
    argv = ["--config", str(workdir / "tiny.json"), "--push_to_hub", "--hub_model_id", "me/tiny-moe"]
    with pytest.raises(ConnectionError, match="no network"):
        moe_train.run([*common_args(tmp_path / "out"), *argv])
    assert created == ["me/tiny-moe"]


def test_push_never_replaces_other_files(scratch_run, tmp_path):
    out, _ = scratch_run
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        moe_push.run(["--model_path", str(out), "--dry_run", "--output_dir", str(folder)])
    assert (folder / "notes.txt").read_text() == "mine"
    for target in (out, out.parent):  # the model folder itself, or a folder holding it
        with pytest.raises(ValueError, match="would replace"):
            moe_push.run(["--model_path", str(out), "--dry_run", "--output_dir", str(target)])
    assert (out / "config.json").is_file()
    export = tmp_path / "export"
    for _ in range(2):  # an earlier export is replaced
        moe_push.run(["--model_path", str(out), "--dry_run", "--output_dir", str(export)])
    assert (export / "README.md").is_file() and (export / "config.json").is_file()


def test_eval_bad_input_errors(scratch_run, tmp_path, monkeypatch):
    out, _ = scratch_run
    monkeypatch.setattr(moe_eval, "load_raw_datasets", lambda *a, **k: pytest.fail("data loaded first"))
    with pytest.raises(ValueError, match="`block_size` \\(128\\) is larger than the model's max_position_embeddings"):
        moe_eval.run(["--model_name_or_path", str(out), "--block_size", "128"])  # the tiny model: 64 positions
    with pytest.raises(ValueError, match="`max_eval_samples` must be at least 1"):
        moe_eval.run(["--model_name_or_path", str(out), "--max_eval_samples", "0"])
    load_model = moe_eval.load_model
    monkeypatch.setattr(moe_eval, "load_model", lambda *a, **k: pytest.fail("model loaded first"))
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"`validation_file` '{missing}' does not exist"):
        moe_eval.run(["--model_name_or_path", str(out), "--validation_file", str(missing)])
    with pytest.raises(ValueError, match="`per_device_eval_batch_size` must be at least 1"):
        moe_eval.run(["--model_name_or_path", str(out), "--per_device_eval_batch_size", "0"])
    monkeypatch.setattr(moe_eval, "load_model", load_model)
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(out / name, no_tokenizer / name)
    with pytest.raises(FileNotFoundError, match=f"'{no_tokenizer}' holds no tokenizer"):
        moe_eval.run(["--model_name_or_path", str(no_tokenizer)])


def test_push_dry_run_writes_upload_folder(scratch_run, tmp_path):
    from huggingface_hub import ModelCard

    out, result = scratch_run
    folder = tmp_path / "upload"
    pushed = moe_push.run(
        ["--model_path", str(out), "--repo_id", "me/tiny-moe", "--dry_run", "--output_dir", str(folder)]
    )
    assert pushed["folder"] == str(folder)
    names = set(os.listdir(folder))
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "modeling_moe.py"} <= names
    assert "expert_load_heatmap.png" in names and not [n for n in names if n.startswith("checkpoint")]
    card = ModelCard.load(folder / "README.md")
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values["perplexity"] == pytest.approx(result["metrics"]["eval_perplexity"], rel=1e-3)
    assert 'from_pretrained("me/tiny-moe", trust_remote_code=True)' in card.text
    config = json.load(open(folder / "config.json"))
    assert "AutoModelForCausalLM" in config["auto_map"]


def test_accuracy_metric_module_matches_numpy():
    from modeling_moe.training.evaluation import load_accuracy_metric

    rng = np.random.default_rng(0)
    predictions, references = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    metric = load_accuracy_metric()
    assert metric.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        float((predictions == references).mean())
    )


CARD_GATING = {
    "noisy_top_k": ({}, "noisy top-k gating", "noisy-top-k-gating"),
    "softmax_top_k": ({}, "softmax top-k gating (no noise)", "softmax-top-k-gating"),
    "hierarchical": (
        dict(num_experts=8, num_expert_groups=2, num_groups_per_tok=2),
        "hierarchical noisy top-k gating",
        "hierarchical-moe",
    ),
    "balanced": ({}, "strictly balanced batchwise gating", "balanced-gating"),
}


@pytest.mark.parametrize("router_type", sorted(CARD_GATING))
def test_model_card_describes_the_router(router_type):
    """The card names the model's own gate, in its text and its tags (it once said "noisy top-k" for every router)."""
    import re

    from huggingface_hub import ModelCard

    from modeling_moe.configuration_moe import ROUTER_TYPES
    from modeling_moe.training.evaluation import parameter_counts
    from modeling_moe.training.hub import render_model_card

    assert sorted(CARD_GATING) == sorted(ROUTER_TYPES)
    overrides, words, tag = CARD_GATING[router_type]
    model = MoEForCausalLM(MoEConfig(**{**TINY, "router_type": router_type, **overrides}))
    card = ModelCard(str(render_model_card(model.config, {}, parameter_counts(model), repo_id="me/tiny")))
    assert not re.search(r"\{\{|\}\}|\{%", card.text)
    assert words in card.text and tag in card.data.tags
    # k: every expert a token goes to (num_groups_per_tok * num_experts_per_tok with the hierarchical router)
    k = 4 if router_type == "hierarchical" else 2
    assert f"**{k} of {model.config.num_experts}**" in card.text and f"| experts per token (k) | {k} |" in card.text
    if router_type in ("softmax_top_k", "balanced"):
        assert "noisy" not in card.text and "noisy-top-k-gating" not in card.data.tags


def test_new_run_refuses_an_output_dir_with_earlier_checkpoints(workdir, tmp_path, monkeypatch):
    # Quickstart into runs/tiny, then the README's "interrupted" run into the same folder: resuming it with
    # `--resume_from_checkpoint true` would continue the Quickstart's newest checkpoint, another run.
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    monkeypatch.setattr(moe_train, "load_raw_datasets", lambda *a, **k: pytest.fail("data loaded first"))
    with pytest.raises(FileExistsError, match="already holds checkpoints of an earlier run \\(checkpoint-4\\)"):
        moe_train.run(["--config", str(workdir / "tiny.json"), *common_args(out, save_strategy="steps")])


def test_resume_true_skips_a_partly_written_checkpoint(workdir, tmp_path):
    # A run killed while Trainer saved checkpoint-4 (trainer_state.json is written last): `true` resumes checkpoint-2.
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"half")
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"")
    args = moe_train.parse_args(["--resume_from_checkpoint", "true", *common_args(out)])[3]
    assert moe_train._resolve_resume(args) == str(out / "checkpoint-2")
    for step in (1, 10):  # the newest complete one, by step number (checkpoint-10 after checkpoint-2)
        shutil.copytree(out / "checkpoint-2", out / f"checkpoint-{step}")
    assert moe_train._resolve_resume(args) == str(out / "checkpoint-10")
    for step in (1, 10):
        shutil.rmtree(out / f"checkpoint-{step}")
    (out / "checkpoint-2" / "optimizer.pt").unlink()  # as saved with --save_only_model: no optimizer, no scheduler
    with pytest.raises(ValueError, match="holds no optimizer or scheduler state"):
        moe_train._resolve_resume(args)
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint found.*checkpoint-4"):
        moe_train._resolve_resume(args)


def test_empty_sample_prompt_skips_the_sample(workdir, tmp_path):
    # As in moe-eval: '' skips the sample (it used to crash after training, before the Hub export was written).
    out = tmp_path / "out"
    argv = ["--config", str(workdir / "tiny.json"), "--sample_prompt", "", "--dry_run", "--skip_eval"]
    result = moe_train.run([*argv, *common_args(out, max_steps=1)])
    assert result["sample"] is None and (out / "hub_export" / "README.md").is_file()


def test_balance_logs_under_accumulation_and_an_evaluation_between_logs(workdir, tmp_path):
    # Two micro-batches per step, a log every 2 steps, an evaluation at step 2 and a last step (3) that is not logged.
    out = tmp_path / "out"
    data = ["--config", str(workdir / "tiny.json"), "--train_file", str(workdir / "train.txt")]
    data += ["--validation_file", str(workdir / "valid.txt"), "--dry_run"]
    settings = dict(max_steps=3, logging_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    settings.update(eval_strategy="steps", eval_steps=2, sample_max_new_tokens=0)
    result = moe_train.run([*data, *common_args(out, **settings)])
    (train_log,) = [h for h in result["log_history"] if "loss" in h]
    assert train_log["step"] == 2
    # Trainer's loss is the mean over the labels of the accumulated step (plus the balancing losses): the logged LM
    # loss is that mean too, not each micro-batch's share of it.
    assert train_log["loss"] == pytest.approx(
        train_log["lm_loss"] + train_log["importance_loss"] + train_log["load_loss"], rel=1e-4
    )
    # The evaluation's own LM loss: the mean next-token NLL that its perplexity comes from.
    eval_logs = [h for h in result["log_history"] if "eval_loss" in h]
    assert eval_logs[0]["step"] == 2
    for log in eval_logs:
        assert log["eval_lm_loss"] == pytest.approx(log["eval_nll"], rel=1e-5)
    # The history holds the training forwards only (2 steps x 2 micro-batches x 2 blocks of 32 tokens, k = 2 experts
    # each at step 2), and the last step, which no log covered, is in it too.
    history = json.load(open(out / "expert_load_history.json"))
    assert [entry["step"] for entry in history] == [2, 3]
    for entry, steps in zip(history, (2, 1), strict=True):
        for layer_counts in entry["tokens_per_expert"]:
            assert sum(layer_counts) == 2 * steps * 2 * 2 * 32
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "hub_export" / "README.md")
    assert "128 tokens per step per device (blocks of 32)" in card.text  # 2 blocks x 2 micro-batches x 32


def test_callback_continues_the_history_of_the_checkpoint_it_resumes(tmp_path):
    # Trainer(...).train(resume_from_checkpoint=True) with the callback, outside moe-train: on_train_begin reads the
    # history saved with `output_dir/checkpoint-<step>`, up to and including that step.
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from modeling_moe.training.callbacks import HISTORY_FILENAME, ExpertBalanceCallback

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    saved = [{"step": step, "tokens_per_expert": [[step, 1.0]]} for step in (2, 4, 6)]
    (checkpoint / HISTORY_FILENAME).write_text(json.dumps(saved))
    callback = ExpertBalanceCallback()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback.on_train_begin(args, TrainerState(global_step=4), TrainerControl())
    assert callback.history == saved[:2]
    fresh = ExpertBalanceCallback()
    fresh.on_train_begin(args, TrainerState(global_step=0), TrainerControl())  # a new run starts an empty history
    assert fresh.history == []


def test_a_history_write_that_fails_leaves_the_checkpoint_resumable(tmp_path):
    # on_save runs after Trainer has written trainer_state.json, so the checkpoint counts as complete: a run stopped
    # while it writes the history must not leave half a JSON file there, which would make resuming from it fail.
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from modeling_moe.training.callbacks import HISTORY_FILENAME, ExpertBalanceCallback

    (tmp_path / "checkpoint-2").mkdir()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    callback = ExpertBalanceCallback()
    callback.history = [{"step": 1, "tokens_per_expert": [[3.0, 1.0]]}, {"step": 2, "tokens_per_expert": object()}]
    with pytest.raises(TypeError, match="not JSON serializable"):  # fails after the first entry
        callback.on_save(args, TrainerState(global_step=2), TrainerControl())
    resumed = ExpertBalanceCallback()
    resumed.on_train_begin(args, TrainerState(global_step=2), TrainerControl())
    assert resumed.history == []
    assert HISTORY_FILENAME not in os.listdir(tmp_path / "checkpoint-2")
    assert os.listdir(tmp_path / "checkpoint-2") == []  # no temporary file left behind either


def test_callback_leaves_forwards_made_before_training_out_of_the_first_log(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from modeling_moe.training.callbacks import ExpertBalanceCallback

    model = MoEForCausalLM(MoEConfig(**TINY, router_type="softmax_top_k")).train()  # no gate noise
    callback = ExpertBalanceCallback()
    callback.attach(model)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids)  # e.g. a sanity check before trainer.train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = TrainerState(global_step=0)
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    model(input_ids=ids[:1], labels=ids[:1])  # the first training step: one sequence of 8 tokens
    state.global_step = 1
    logs = {"loss": 1.0}
    callback.on_log(args, state, TrainerControl(), logs=logs)
    assert [sum(layer) for layer in callback.history[0]["tokens_per_expert"]] == [2 * 8] * TINY["num_hidden_layers"]
    assert logs["lm_loss"] == pytest.approx(model(input_ids=ids[:1], labels=ids[:1]).lm_loss.item(), rel=1e-5)


def test_heatmap_shows_each_log_steps_share_of_the_tokens(tmp_path, monkeypatch):
    import matplotlib.axes

    from modeling_moe.training.callbacks import plot_expert_load_heatmap

    shown, titles = [], []
    imshow, set_title = matplotlib.axes.Axes.imshow, matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda self, x, **k: shown.append(x) or imshow(self, x, **k))
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda self, t, **k: titles.append(t) or set_title(self, t, **k)
    )
    history = [
        {"step": 5, "tokens_per_expert": [[30.0, 10.0], [0.0, 0.0]]},
        {"step": 10, "tokens_per_expert": [[1.0, 3.0], [2.0, 2.0]]},
    ]
    plot_expert_load_heatmap(history, str(tmp_path / "heatmap.png"), layer_indices=[1, 3])
    # (experts, log steps) per MoE layer: each step's column is its tokens' shares (a step without tokens stays 0).
    np.testing.assert_allclose(shown[0], [[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(shown[1], [[0.0, 0.5], [0.0, 0.5]])
    assert titles[0].startswith("MoE layer 1:") and titles[1].startswith("MoE layer 3:")
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_corpus_split_is_every_20th_document_for_validation():
    from modeling_moe.training.data import default_corpus

    documents = default_corpus_documents()
    corpus = default_corpus()
    assert corpus["validation"]["text"] == documents[19::20]
    assert corpus["train"]["text"] == [d for i, d in enumerate(documents) if (i + 1) % 20]


def test_validation_split_is_the_first_percentage_of_train_and_apart_from_it(tmp_path):
    # run_clm.py: without a validation split, `train[:p%]` validates and `train[p%:]` trains.
    from modeling_moe.training.data import load_raw_datasets

    lines = [f"line {i}" for i in range(20)]
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(lines) + "\n")
    raw = load_raw_datasets(train_file=str(train_file), validation_split_percentage=10, cache_dir=str(tmp_path / "c"))
    assert [t.strip() for t in raw["validation"]["text"]] == lines[:2]
    assert [t.strip() for t in raw["train"]["text"]] == lines[2:]
    with pytest.raises(ValueError, match="needs its own validation split"):
        load_raw_datasets(train_file=str(train_file), streaming=True, cache_dir=str(tmp_path / "c"))
    # Too few examples for the percentage: an error naming the file and the percentage (datasets' own error was
    # 'Instruction "train[:5%]" corresponds to no data!').
    small_file = tmp_path / "small.txt"
    small_file.write_text("\n".join(lines[:5]) + "\n")
    for percentage, held_out in ((5, 0), (95, 5)):
        with pytest.raises(
            ValueError,
            match=f"`validation_split_percentage` {percentage}% of the 5 examples of `train_file` '{small_file}' "
            f"holds out {held_out}, which leaves the validation or the training split empty",
        ):
            load_raw_datasets(
                train_file=str(small_file), validation_split_percentage=percentage, cache_dir=str(tmp_path / "c")
            )


def test_tokenize_and_pack_appends_eos_skips_empty_texts_and_drops_the_tail(scratch_run):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from modeling_moe.training.data import tokenize_and_pack

    out, _ = scratch_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["def f(x):\n    return x", "", "import os", "class A:\n    pass", ""]
    raw = DatasetDict({"train": Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})})
    # Independently: each non-empty text's tokens then EOS, concatenated, cut into blocks, the incomplete tail dropped.
    stream = [
        i for t in texts if t for i in tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    block_size = 6
    expected = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    assert len(stream) % block_size and expected
    packed = tokenize_and_pack(raw, tokenizer, "text", block_size)["train"]
    assert packed.column_names == ["input_ids", "attention_mask", "labels"]
    assert packed["input_ids"] == expected and packed["labels"] == expected
    assert packed["attention_mask"] == [[1] * block_size] * len(expected)


def test_text_column_resolution():
    from datasets import Dataset

    from modeling_moe.training.data import resolve_text_column

    both = Dataset.from_dict({"text": ["a"], "body": ["b"]})
    assert resolve_text_column(both, "body") == "body" and resolve_text_column(both, None) == "text"
    assert resolve_text_column(Dataset.from_dict({"id": [1], "body": ["b"]}), None) == "body"
    with pytest.raises(ValueError, match="no 'text' column .*--text_column_name"):
        resolve_text_column(Dataset.from_dict({"title": ["a"], "body": ["b"]}), None)  # which one?
    with pytest.raises(ValueError, match="`text_column_name` 'content' is not a column"):
        resolve_text_column(both, "content")
    assert resolve_text_column(both.to_iterable_dataset(), "body") == "body"


def test_data_file_extension_is_case_insensitive(tmp_path):
    from modeling_moe.training.data import check_data_file

    for name, builder in (("A.TXT", "text"), ("b.JSONL", "json"), ("c.Csv", "csv")):
        (tmp_path / name).write_text("x\n")
        assert check_data_file(str(tmp_path / name), "train_file") == builder


def test_metrics_ignore_padding_labels():
    # Perplexity and accuracy over the labels that count (not -100), against numpy.
    from transformers import EvalPrediction

    from modeling_moe.training.evaluation import build_compute_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, (3, 9))
    labels[0, 5:] = -100  # padded rows of different lengths
    labels[2, :7] = -100
    predictions = rng.integers(0, 7, (3, 8))
    nll = rng.uniform(0.1, 5.0, (3, 8))
    targets = labels[:, 1:]
    counted = targets != -100
    metrics = build_compute_metrics()(EvalPrediction(predictions=(predictions, nll), label_ids=labels))
    assert metrics["nll"] == pytest.approx(nll[counted].mean())  # per label, not per row
    assert metrics["perplexity"] == pytest.approx(math.exp(nll[counted].mean()))
    assert metrics["accuracy"] == pytest.approx((predictions == targets)[counted].mean())


def test_active_parameters_count_every_expert_a_token_uses():
    # Hierarchical gating: a token uses num_groups_per_tok * num_experts_per_tok experts of each MoE layer.
    from modeling_moe.training.evaluation import parameter_counts, summary_rows

    config = MoEConfig(
        **{**TINY, "num_hidden_layers": 3, "moe_layers": [0, 2], "num_experts": 8, "router_type": "hierarchical"},
        num_expert_groups=2,
        num_groups_per_tok=2,
    )
    model = MoEForCausalLM(config)
    counts = parameter_counts(model)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 2 * config.hidden_size * config.expert_intermediate_size  # ReLU expert: up and down matrices
    assert counts == {"total_parameters": total, "active_parameters": total - 2 * (8 - 2 * 2) * per_expert}
    rows = dict(summary_rows({}, config, counts))
    assert rows["MoE layers"] == 2 and rows["experts per token (k)"] == 4 and rows["experts per MoE layer (n)"] == 8


def test_hub_folder_replaces_only_an_earlier_export(tmp_path):
    from modeling_moe.training.hub import check_hub_folder

    cases = {
        "readme_only": ["README.md"],  # e.g. a dataset or a repo clone: not an export
        "with_subfolder": ["README.md", "config.json", "checkpoint-2/"],  # a run's output folder
        "export": ["README.md", "config.json", "model.safetensors"],
    }
    for name, files in cases.items():
        for file in files:
            path = tmp_path / name / file
            path.mkdir(parents=True) if file.endswith("/") else path.parent.mkdir(parents=True, exist_ok=True)
            if not file.endswith("/"):
                path.write_text("x")
    for name in ("readme_only", "with_subfolder"):
        with pytest.raises(FileExistsError, match="not an earlier export"):
            check_hub_folder(str(tmp_path / name))
    check_hub_folder(str(tmp_path / "export"))
    check_hub_folder(str(tmp_path / "new"))


def test_write_hub_folder_leaves_nothing_behind_when_it_fails(tmp_path, monkeypatch):
    from modeling_moe.training.evaluation import parameter_counts
    from modeling_moe.training.hub import render_model_card, write_hub_folder

    model = MoEForCausalLM(MoEConfig(**TINY))
    card = render_model_card(model.config, {}, parameter_counts(model), repo_id="me/tiny")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        write_hub_folder(model, None, card, str(precious))
    assert os.listdir(precious) == ["notes.txt"]
    export = tmp_path / "export"
    write_hub_folder(model, None, card, str(export))
    before = sorted(os.listdir(export))

    def broken_save(folder, **kwargs):
        (tmp_path / "seen").write_text(folder)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_hub_folder(model, None, card, str(export))
    assert sorted(os.listdir(export)) == before  # the earlier export is left whole
    assert sorted(os.listdir(tmp_path)) == ["export", "precious", "seen"]  # and no staging folder


def test_lora_dry_run_exports_and_pushes_the_merged_model(scratch_run, workdir, tmp_path):
    # Without --merge: the Hub export (moe-train --dry_run, and moe-push of the adapters folder) is still the merged
    # model, a plain MoEForCausalLM checkpoint, not the adapters.
    from peft import PeftModel

    out, _ = scratch_run
    lora_dir = tmp_path / "lora"
    args = ["--model_name_or_path", str(out), "--train_file", str(workdir / "train.txt"), "--lora", "--dry_run"]
    moe_train.run([*args, *common_args(lora_dir, max_steps=1, learning_rate=0.05, sample_max_new_tokens=0)])
    reloaded = PeftModel.from_pretrained(MoEForCausalLM.from_pretrained(out), lora_dir).eval()
    ids = torch.randint(0, reloaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
    pushed = tmp_path / "pushed"
    moe_push.run(["--model_path", str(lora_dir), "--dry_run", "--output_dir", str(pushed)])
    for folder in (lora_dir / "hub_export", pushed):
        assert not (folder / "adapter_config.json").exists()
        exported = MoEForCausalLM.from_pretrained(folder).eval()
        assert exported.state_dict().keys() == MoEForCausalLM.from_pretrained(out).state_dict().keys()
        with torch.no_grad():
            torch.testing.assert_close(exported(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_push_reads_the_metrics_file_it_is_given(scratch_run, tmp_path):
    from huggingface_hub import ModelCard

    out, _ = scratch_run
    with pytest.raises(FileNotFoundError, match="`metrics_file` .* does not exist"):
        moe_push.run(["--model_path", str(out), "--dry_run", "--metrics_file", str(tmp_path / "missing.json")])
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps({"eval_perplexity": 12.5, "eval_accuracy": 0.25}))
    folder = tmp_path / "upload"
    moe_push.run(
        ["--model_path", str(out), "--dry_run", "--output_dir", str(folder), "--metrics_file", str(metrics_file)]
    )
    values = {r.metric_type: r.metric_value for r in ModelCard.load(folder / "README.md").data.eval_results}
    assert values == {"perplexity": 12.5, "accuracy": 0.25}
    # Without one: the run's all_results.json, before an eval_results.json (e.g. a later moe-eval --output_dir there).
    model_path = tmp_path / "model"
    shutil.copytree(out, model_path, ignore=shutil.ignore_patterns("hub_export", "runs"))
    (model_path / "eval_results.json").write_text(metrics_file.read_text())
    moe_push.run(["--model_path", str(model_path), "--dry_run"])
    card = ModelCard.load(model_path / "hub_export" / "README.md")
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    all_results = json.load(open(out / "all_results.json"))
    assert values["perplexity"] == pytest.approx(all_results["eval_perplexity"], rel=1e-3)


def test_push_names_a_metrics_file_it_cannot_read_before_loading_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(moe_push, "load_model", lambda *a, **k: pytest.fail("model loaded before the metrics"))
    model_path = tmp_path / "model"
    model_path.mkdir()
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"eval_perplexity": 12.')
    listed = tmp_path / "listed.json"
    listed.write_text("[12.5]")
    argv = ["--model_path", str(model_path), "--dry_run", "--metrics_file"]
    with pytest.raises(ValueError, match=f"Metrics file '{truncated}' is not valid JSON"):
        moe_push.run([*argv, str(truncated)])
    with pytest.raises(ValueError, match=f"Metrics file '{listed}' must hold a mapping of metrics, got list"):
        moe_push.run([*argv, str(listed)])
    shutil.copy2(truncated, model_path / "all_results.json")  # e.g. a run stopped while writing it
    with pytest.raises(ValueError, match="Metrics file '.*all_results.json' is not valid JSON"):
        moe_push.run(argv[:-1])


def test_save_atomically_moves_the_config_in_last(tmp_path, monkeypatch):
    # A model folder is loadable only once every file is in place: an earlier config is removed first and the new one
    # moved in last, so a save that fails while moving leaves no config beside partial weights.
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_text("old")

    def save(folder):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            with open(os.path.join(folder, name), "w") as f:
                f.write("new")

    moved, replace = [], os.replace

    def recording_replace(source, target):
        moved.append(os.path.basename(target))
        replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    moe_train.save_atomically(save, str(out))
    assert moved[-1] == "config.json" and sorted(moved) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "config.json").read_text() == "new"

    def failing_replace(source, target):
        if os.path.basename(target) == "model.safetensors":
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        moe_train.save_atomically(save, str(out))
    assert not (out / "config.json").exists()
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


def test_expert_parallel_keeps_the_ddp_timeout_it_is_given(workdir, tmp_path, monkeypatch):
    # Only TrainingArguments' default (30 min) is replaced by the bounded one; the model is saved without optimizer.
    from modeling_moe.expert_parallel import DEFAULT_TIMEOUT_S

    joined = []
    monkeypatch.setattr(moe_train, "init_distributed", lambda timeout_s, use_cpu=False: joined.append(timeout_s))
    monkeypatch.setattr(moe_train, "validate_expert_parallel_size", lambda size, num_experts: None)  # 1 process
    for extra, timeout in (([], int(DEFAULT_TIMEOUT_S)), (["--ddp_timeout", "77"], 77)):
        argv = ["--config", str(workdir / "tiny.json"), "--expert_parallel", "2", *extra]
        model_args, _, run_args, training_args = moe_train.parse_args([*argv, *common_args(tmp_path / "out")])
        assert moe_train.setup_expert_parallel(model_args, run_args, training_args, dict(TINY)) == 2
        assert training_args.ddp_timeout == timeout and joined[-1] == timeout
        assert training_args.save_only_model


def test_lora_dropout_may_be_one(tmp_path):
    MoEConfig(**TINY).save_pretrained(tmp_path / "saved")
    argv = ["--model_name_or_path", str(tmp_path / "saved"), "--lora", "--lora_dropout", "1", "--lora_experts", "false"]
    assert moe_train.check_arguments(*moe_train.parse_args([*argv, *common_args(tmp_path / "out")])) is None
