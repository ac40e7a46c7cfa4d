#!/usr/bin/env python
"""Thin wrapper around `modeling_moe.cli.evaluate.main` (the `moe-eval` console command)."""

import os
import sys

# `python scripts/evaluate.py` puts this folder first on sys.path, where `scripts/evaluate.py` would shadow the
# `evaluate` library the CLI imports.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from modeling_moe.cli.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
