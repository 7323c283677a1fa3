"""Benchmarks: `python -m benchmarks.<name> [--quick]` prints JSON."""
