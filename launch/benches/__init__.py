"""Benchmark suites for launch/bench.py: each module exposes run(args) -> dict of figures."""
