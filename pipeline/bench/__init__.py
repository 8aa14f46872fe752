"""Benchmarks: `pipeline bench convert|loader|train` (figures go to docs/BENCHMARKS.md)."""
