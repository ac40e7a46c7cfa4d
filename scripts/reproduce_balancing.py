"""Small-scale reproduction of the paper's Table 6: the effect of the importance and load balancing losses.

The same MoE language model (noisy top-k gate, k=4) is trained once per `(w_importance, w_load)` pair of Table 6 on
the Python standard library's source (byte level, fixed split and seeds; see `modeling_moe.reproduction`), and
evaluated on the validation split: perplexity per byte and, over all validation tokens of the MoE layer (evaluation
mode, no noise), CV(Importance), CV(Load) and max/mean Load (SPEC §3). A second table gives the same statistics with the
training-time gate noise on. Writes `balancing.md` (beside the paper's numbers) and `balancing.json` to `--output_dir`.

    python scripts/reproduce_balancing.py                 # default settings (~20-25 min on 2 CPU cores)
    python scripts/reproduce_balancing.py --quick --output_dir /tmp/balancing   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
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

# SPEC §7, Table 6 (MoE-256 on 1B Word): (w_importance, w_load) -> (test ppl, CV(Importance), CV(Load), max/mean Load).
PAPER_TABLE_6 = {
    (0.0, 0.0): (39.8, 3.04, 3.01, 17.80),
    (0.2, 0.0): (35.6, 0.06, 0.17, 1.47),
    (0.0, 0.2): (35.7, 0.22, 0.04, 1.15),
    (0.1, 0.1): (35.6, 0.06, 0.05, 1.14),
    (0.01, 0.01): (35.7, 0.48, 0.11, 1.37),
    (1.0, 1.0): (35.7, 0.03, 0.02, 1.07),
}
DEFAULT_NUM_EXPERTS = 64
QUICK_NUM_EXPERTS = 8


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| w_importance | w_load | val ppl/byte | CV(Importance) | CV(Load) | max/mean Load "
        "| paper test ppl/word | paper CV(Imp.) | paper CV(Load) | paper max/mean |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        paper = PAPER_TABLE_6[(row["w_importance"], row["w_load"])]
        m = row["metrics"]
        lines.append(
            f"| {row['w_importance']} | {row['w_load']} | {format_number(m['val_ppl'], 3)} "
            f"| {format_number(m['cv_importance'])} | {format_number(m['cv_load'])} | {format_number(m['max_mean_load'])} "
            f"| {paper[0]} | {paper[1]} | {paper[2]} | {paper[3]} |"
        )
    return header + "\n".join(lines) + "\n"


def noisy_routing_table(rows: list[dict]) -> str:
    """The same models' balance when routing with the training-time gate noise (token counts, validation set)."""
    lines = [
        "| w_importance | w_load | CV(Importance), noisy gate | CV(Load), noisy gate | max/mean Load, noisy gate |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['w_importance']} | {row['w_load']} | {format_number(m['noisy_cv_importance'])} "
            f"| {format_number(m['noisy_cv_load'])} | {format_number(m['noisy_max_mean_load'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--num_experts", type=int, default=None, help=f"Experts in the MoE layer (default {DEFAULT_NUM_EXPERTS})."
    )
    args = parser.parse_args(argv)
    settings, max_bytes = settings_from_args(args)
    num_experts = args.num_experts
    if num_experts is None:
        num_experts = QUICK_NUM_EXPERTS if args.quick else DEFAULT_NUM_EXPERTS
    if num_experts <= settings.num_experts_per_tok:
        raise ValueError(
            f"`--num_experts` must exceed k={settings.num_experts_per_tok} for the balance to matter, got {num_experts}."
        )

    corpus = load_corpus(max_bytes=max_bytes)
    print(f"corpus: {json.dumps(corpus.describe())}", flush=True)
    print(f"settings: {settings}", flush=True)
    rows = []
    start = time.perf_counter()
    for w_importance, w_load in PAPER_TABLE_6:
        name = f"w_importance={w_importance}, w_load={w_load}"
        config = model_config(settings, num_experts, importance_loss_coef=w_importance, load_loss_coef=w_load)
        result = train_and_evaluate(
            name, config, corpus, settings, log=lambda s: print(s, flush=True), noisy_statistics=True
        )
        m = result.metrics
        print(
            f"{name}: val ppl {m['val_ppl']:.4f}, CV(Importance) {m['cv_importance']:.3f}, CV(Load) {m['cv_load']:.3f}, "
            f"max/mean Load {m['max_mean_load']:.2f} ({result.train_seconds:.0f}s)",
            flush=True,
        )
        rows.append({"w_importance": w_importance, "w_load": w_load, **result.to_dict()})

    table = markdown_table(rows) + "\n" + noisy_routing_table(rows)
    report = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_description(),
        "corpus": corpus.describe(),
        "settings": settings.__dict__,
        "num_experts": num_experts,
        "total_seconds": time.perf_counter() - start,
        "rows": rows,
    }
    write_atomically(f"{args.output_dir}/balancing.json", json.dumps(report, indent=2) + "\n")
    write_atomically(f"{args.output_dir}/balancing.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
