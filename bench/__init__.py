"""Benchmarks: ``python -m bench --out DIR`` runs every GPU benchmark and prints one summary table."""
