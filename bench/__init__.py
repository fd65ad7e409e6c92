"""Benchmarks. Each runs the competitor side by side in the same run, prints ratios,
supports `--quick`, and prints its figures as one JSON line last."""
