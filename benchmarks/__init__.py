"""Benchmark drivers (scripts) and their shared harness (``benchmarks.harness``); not part of the installed package."""
