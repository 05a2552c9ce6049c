"""Benchmark scripts (one per operation) and their shared helpers; see benchmarks/RESULTS.md."""
