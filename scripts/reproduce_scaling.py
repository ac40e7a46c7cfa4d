"""Small-scale reproduction of the paper's Table 7 trend: more experts at (about) equal compute per token.

A dense baseline (feed-forward blocks of `k * expert_intermediate_size` hidden units) and MoE language models with 4,
16, 64 and 256 experts (flat noisy top-k, k=4) and 256 experts in a two-level hierarchy (16 groups of 16, k=2 per level,
so again 4 experts per token; SPEC §4), all with the same active parameters per token, trained on the same tokens of
the Python standard library's source (byte level, fixed split and seeds; see `modeling_moe.reproduction`). Reports
validation perplexity per byte, total and active parameters, forward FLOPs per token and training tokens/s (with, as
diagnostics, the perplexity when routing with the training-time gate noise, CV(Load) at evaluation and the final
training loss), as `scaling.md` and `scaling.json`, and plots perplexity against the number of experts (`scaling.png`).

    python scripts/reproduce_scaling.py                   # default settings (~20-25 min on 2 CPU cores)
    python scripts/reproduce_scaling.py --quick --output_dir /tmp/scaling   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from modeling_moe.reproduction import (
    add_common_arguments,
    format_number,
    load_corpus,
    machine_description,
    model_config,
    settings_from_args,
    train_and_evaluate,
    write_atomically,
)

# SPEC §7, Table 7 at about equal compute (8.4-8.9M ops/timestep): experts -> test perplexity per word.
PAPER_TABLE_7 = [("MoE-4", 4, 45.0), ("MoE-32", 32, 39.7), ("MoE-256", 256, 35.7), ("MoE-1024-h", 1024, 34.6)]
PAPER_TABLE_7.append(("MoE-4096-h", 4096, 34.1))
# Three times the tokens of the balancing comparison (4.9M): the question here is what extra capacity buys.
SCRIPT_DEFAULTS = {"batch_size": 32, "steps": 1200}


def model_specs(quick: bool) -> list[dict]:
    """(name, num_experts, extra config) of every row; num_experts=0 is the dense baseline."""
    if quick:
        flat, hierarchical = (
            [4, 8],
            dict(num_experts=8, num_expert_groups=2, num_groups_per_tok=2, num_experts_per_tok=2),
        )
    else:
        flat = [4, 16, 64, 256]
        hierarchical = dict(num_experts=256, num_expert_groups=16, num_groups_per_tok=2, num_experts_per_tok=2)
    specs = [{"name": "dense", "num_experts": 0, "overrides": {}}]
    specs += [{"name": f"MoE-{n}", "num_experts": n, "overrides": {}} for n in flat]
    n = hierarchical.pop("num_experts")
    groups = hierarchical["num_expert_groups"]
    specs.append(
        {
            "name": f"MoE-{n}-h ({groups}x{n // groups})",
            "num_experts": n,
            "overrides": {"router_type": "hierarchical", **hierarchical},
        }
    )
    # Not at equal compute: a dense model with 4x the feed-forward width (4x the active FFN parameters, the total
    # expert parameters of MoE-16). It tells whether extra capacity helps at all at this token budget.
    specs.append({"name": "dense-4x (reference)", "num_experts": 0, "overrides": {"wide_factor": 4}, "reference": True})
    return specs


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| model | experts | experts/token | val ppl/byte | val loss (nats/byte) | total params | active params "
        "| forward FLOPs/token | train tokens/s | val ppl/byte, noisy gate | CV(Load) | final train loss |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['name']} | {row['num_experts'] or '-'} | {row['experts_per_token'] or '-'} "
            f"| {format_number(m['val_ppl'], 3)} | {format_number(m['val_loss'], 4)} | {row['total_params']:,} "
            f"| {row['active_params']:,} | {row['flops_per_token']:,} | {row['tokens_per_second']:,.0f} "
            f"| {format_number(m.get('noisy_val_ppl', m['val_ppl']), 3)} | {format_number(m['cv_load']) if 'cv_load' in m else '-'} "
            f"| {format_number(row['final_train_lm_loss'], 4)} |"
        )
    return header + "\n".join(lines) + "\n"


def paper_table() -> str:
    lines = ["| paper model (1B Word) | experts | test ppl/word |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {ppl} |" for name, n, ppl in PAPER_TABLE_7]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Validation perplexity against the number of experts (log scale); the dense baseline as a horizontal line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    flat = [r for r in rows if r["num_experts"] and r["config"]["router_type"] != "hierarchical"]
    hierarchical = [r for r in rows if r["config"]["router_type"] == "hierarchical"]
    dense = [r for r in rows if not r["num_experts"] and not r["reference"]]
    wide = [r for r in rows if r["reference"]]
    axis.plot([r["num_experts"] for r in flat], [r["metrics"]["val_ppl"] for r in flat], "o-", label="MoE (flat, k=4)")
    if hierarchical:
        axis.plot(
            [r["num_experts"] for r in hierarchical],
            [r["metrics"]["val_ppl"] for r in hierarchical],
            "s",
            markersize=9,
            label="MoE (hierarchical, k=2x2)",
        )
    for r in dense:
        axis.axhline(r["metrics"]["val_ppl"], color="gray", linestyle="--", label="dense (same active size)")
    for r in wide:
        axis.axhline(r["metrics"]["val_ppl"], color="green", linestyle=":", label="dense, 4x wider FFN (4x compute)")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("number of experts")
    axis.set_ylabel("validation perplexity per byte")
    axis.set_title("Equal active parameters and tokens (stdlib source, bytes)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, script_defaults=SCRIPT_DEFAULTS)
    args = parser.parse_args(argv)
    settings, max_bytes = settings_from_args(args, SCRIPT_DEFAULTS)

    corpus = load_corpus(max_bytes=max_bytes)
    print(f"corpus: {json.dumps(corpus.describe())}", flush=True)
    print(f"settings: {settings}", flush=True)
    rows = []
    start = time.perf_counter()
    for spec in model_specs(args.quick):
        overrides = dict(spec["overrides"])
        if "wide_factor" in overrides:
            overrides["intermediate_size"] = (
                overrides.pop("wide_factor") * settings.num_experts_per_tok * settings.expert_intermediate_size
            )
        config = model_config(settings, spec["num_experts"], **overrides)
        result = train_and_evaluate(
            spec["name"], config, corpus, settings, log=lambda s: print(s, flush=True), noisy_statistics=True
        )
        row = {
            **result.to_dict(),
            "num_experts": spec["num_experts"],
            "experts_per_token": config.experts_per_token if spec["num_experts"] else 0,
            "reference": spec.get("reference", False),
        }
        print(
            f"{spec['name']}: val ppl {result.metrics['val_ppl']:.4f}, params {result.total_params:,} total / "
            f"{result.active_params:,} active, {result.flops_per_token:,} FLOPs/token, "
            f"{result.tokens_per_second:,.0f} tokens/s ({result.train_seconds:.0f}s)",
            flush=True,
        )
        if not math.isfinite(result.metrics["val_ppl"]):
            raise FloatingPointError(f"{spec['name']}: validation perplexity is {result.metrics['val_ppl']}.")
        rows.append(row)

    table = markdown_table(rows)
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_description(),
        "corpus": corpus.describe(),
        "settings": settings.__dict__,
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    plot(rows, f"{args.output_dir}/scaling.png")
    write_atomically(f"{args.output_dir}/scaling.json", json.dumps(report, indent=2) + "\n")
    write_atomically(f"{args.output_dir}/scaling.md", table + "\n" + paper_table())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
