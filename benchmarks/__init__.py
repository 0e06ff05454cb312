"""Benchmarks: `python -m benchmarks [--quick] [--json]`. Figures, not pass/fail: see README "Performance" and docs/performance.md."""
