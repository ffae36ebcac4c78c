"""Benchmark helpers for test_alpaca.py: workloads, runs, metrics, CSV results, plots."""
