#!/usr/bin/env python
"""Thin wrapper around `modeling_moe.cli.evaluate.main` (the `moe-eval` console command)."""

from modeling_moe.cli.evaluate import main

if __name__ == "__main__":
    main()
