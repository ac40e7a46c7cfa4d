#!/usr/bin/env python
"""Thin wrapper around `modeling_moe.cli.push_to_hub.main` (the `moe-push` console command)."""

from modeling_moe.cli.push_to_hub import main

if __name__ == "__main__":
    main()
