"""Command-line entry points (moe-train, moe-eval, moe-push, moe-bench)."""
