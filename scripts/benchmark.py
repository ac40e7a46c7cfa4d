"""Thin wrapper: `python scripts/benchmark.py ...` is `moe-bench ...` (see modeling_moe/cli/benchmark.py)."""

from modeling_moe.cli.benchmark import main

if __name__ == "__main__":
    main()
