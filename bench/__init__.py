"""Reproducible benchmarks (``python -m bench.<name>``); results are reported in BENCHMARKS.md."""
