"""Smoke tests of the reproduction scripts (`--quick`) and unit tests of their shared module."""

import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from modeling_moe import MoEForCausalLM
from modeling_moe.reproduction import (
    QUICK_RESULTS_DIR,
    RESULTS_DIR,
    TrainSettings,
    add_common_arguments,
    evaluate,
    forward_flops_per_token,
    is_validation_file,
    load_corpus,
    model_config,
    parameter_counts,
    settings_from_args,
    stdlib_source_files,
)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(autouse=True)
def keep_the_thread_count():
    """The scripts set torch's thread count (`--threads`, default 1): give the later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(markdown: str) -> list[list[str]]:
    """Body rows of the first markdown table, as lists of cell strings."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    rows = [r for r in rows if len(r) == len(header)]
    return header, rows


def _is_finite_number(cell: str) -> bool:
    try:
        return math.isfinite(float(cell.replace(",", "")))
    except ValueError:
        return False


def test_corpus_split_is_fixed_and_disjoint():
    corpus = load_corpus(max_bytes=300_000)
    again = load_corpus(max_bytes=300_000)
    assert corpus.sha256 == again.sha256
    assert corpus.num_train_files > 0 and corpus.num_validation_files > 0
    # The split is decided by path hash alone: about 1 file in 10 is validation.
    files = stdlib_source_files()
    root = Path(corpus.root)
    validation = [p for p in files if is_validation_file(p.relative_to(root).as_posix())]
    assert 0.05 < len(validation) / len(files) < 0.2
    assert not any("site-packages" in p.parts or "test" in p.parts for p in files)
    # Byte-level tokens are the files' bytes: the first train file starts the train split.
    train_files = [p for p in files if not is_validation_file(p.relative_to(root).as_posix()) and p.stat().st_size]
    first = train_files[0].read_bytes()
    assert bytes(corpus.train[: len(first)].tolist()) == first


def test_bad_corpus_arguments_raise():
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(max_bytes=0)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_corpus(root="/nonexistent/stdlib")
    with pytest.raises(ValueError, match="num_experts"):
        model_config(TrainSettings(), -1)


@pytest.mark.parametrize("script", ["reproduce_balancing", "reproduce_scaling"])
def test_bad_script_arguments_raise_before_any_training(tmp_path, monkeypatch, script):
    module = _load_script(script)

    def no_training(*args, **kwargs):
        raise AssertionError("a model was trained before the bad argument was reported")

    monkeypatch.setattr(module, "train_and_evaluate", no_training)
    monkeypatch.setattr(module, "load_corpus", no_training)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(PermissionError, match=f"`output_dir` '{not_a_folder}/out' is not writable"):
        module.main(["--quick", "--output_dir", str(not_a_folder / "out")])
    with pytest.raises(ValueError, match="`seq_len` must be at least 2 .*, got 1"):
        module.main(["--quick", "--seq_len", "1", "--output_dir", str(tmp_path)])
    if script == "reproduce_balancing":  # 0 is a value, not "use the default"
        with pytest.raises(ValueError, match="`--num_experts` must exceed k=4 .*, got 0"):
            module.main(["--quick", "--num_experts", "0", "--output_dir", str(tmp_path)])


def test_quick_runs_default_to_a_folder_apart_from_the_committed_results(tmp_path, monkeypatch):
    # A smoke test run with no --output_dir must not overwrite docs/results (the measured tables of the README).
    import argparse

    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    monkeypatch.chdir(tmp_path)
    for argv, expected in (
        ([], RESULTS_DIR),
        (["--quick"], QUICK_RESULTS_DIR),
        (["--quick", "--output_dir", "x"], "x"),
    ):
        args = parser.parse_args(argv)
        settings_from_args(args)
        assert args.output_dir == expected
    assert os.path.normpath(QUICK_RESULTS_DIR) != os.path.normpath(RESULTS_DIR)


def test_dense_baseline_matches_moe_active_size():
    settings = TrainSettings(hidden_size=32, num_attention_heads=2, expert_intermediate_size=16, seq_len=16)
    dense = MoEForCausalLM(model_config(settings, 0))
    moe = MoEForCausalLM(model_config(settings, 16))
    dense_counts, moe_counts = parameter_counts(dense), parameter_counts(moe)
    # Independent count: the MoE model adds 12 unused experts (2 * 32 * 16 each) and a gate (W_g, W_noise: 2 * 32 * 16).
    expert = 2 * 32 * 16
    assert moe_counts["total_params"] - dense_counts["total_params"] == 16 * expert - 4 * expert + 2 * 32 * 16
    assert moe_counts["active_params"] - dense_counts["active_params"] == 2 * 32 * 16
    # FLOPs differ only by the gate (eval: x W_g, one multiply-add per hidden unit and expert).
    assert forward_flops_per_token(moe.config, 16) - forward_flops_per_token(dense.config, 16) == 2 * 32 * 16


def test_evaluate_reports_expert_statistics_over_all_batches():
    torch.manual_seed(0)
    settings = TrainSettings(hidden_size=32, num_attention_heads=2, expert_intermediate_size=16, seq_len=16)
    model = MoEForCausalLM(model_config(settings, 8))
    with torch.no_grad():  # a non-zero gate so the load is uneven
        model.model.layers[1].mlp.gate.weight.normal_()
    batches = [torch.randint(0, 256, (4, 16)) for _ in range(3)]
    result = evaluate(model, batches)
    # Independent reference: token counts per expert over all batches from the model's own routing outputs.
    model.eval()
    load = torch.zeros(8)
    with torch.no_grad():
        for batch in batches:
            load += model(input_ids=batch).router_outputs[0].tokens_per_expert
    assert load.sum() == 3 * 4 * 16 * 4
    expected_cv = (load.var(unbiased=False).sqrt() / load.mean()).item()
    assert result["cv_load"] == pytest.approx(expected_cv, rel=1e-5)
    assert result["max_mean_load"] == pytest.approx((load.max() / load.mean()).item(), rel=1e-5)
    assert math.isfinite(result["val_ppl"]) and result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))


def test_quick_balancing_writes_every_row(tmp_path):
    module = _load_script("reproduce_balancing")
    assert module.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    header, rows = _table_rows((tmp_path / "balancing.md").read_text())
    assert len(header) == 10
    assert {(float(r[0]), float(r[1])) for r in rows} == set(module.PAPER_TABLE_6)
    assert all(_is_finite_number(cell) for row in rows for cell in row)
    report = json.loads((tmp_path / "balancing.json").read_text())
    assert len(report["rows"]) == 6
    assert all(r["train_tokens"] == report["rows"][0]["train_tokens"] for r in report["rows"])


def test_quick_scaling_writes_every_row_and_plot(tmp_path):
    module = _load_script("reproduce_scaling")
    assert module.main(["--quick", "--output_dir", str(tmp_path)]) == 0
    text = (tmp_path / "scaling.md").read_text()
    header, rows = _table_rows(text)
    assert len(header) == 12
    names = [r[0] for r in rows]
    assert names[0] == "dense" and any(re.match(r"MoE-\d+-h", n) for n in names) and len(rows) == 5
    for row in rows:
        cells = [
            c for c, name in zip(row, header, strict=True) if not (row[0].startswith("dense") and name == "CV(Load)")
        ]
        assert all(_is_finite_number(cell) for cell in cells[3:]), row
    report = json.loads((tmp_path / "scaling.json").read_text())
    # Equal active parameters per token up to the gate, equal tokens.
    dense, *moes = [r for r in report["rows"] if not r["reference"]]
    (wide,) = [r for r in report["rows"] if r["reference"]]
    assert wide["config"]["intermediate_size"] == 4 * dense["config"]["intermediate_size"]
    assert all(r["train_tokens"] == dense["train_tokens"] for r in moes)
    for r in moes:
        gate = r["active_params"] - dense["active_params"]
        assert 0 < gate <= 2 * r["config"]["hidden_size"] * (r["num_experts"] + r["config"]["num_expert_groups"])
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
