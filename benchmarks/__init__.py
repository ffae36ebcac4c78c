"""Benchmarks: test_alpaca.py's workloads, runs, metrics, CSV results and plots; the CPU and
GPU targets; random-weight checkpoints of any shape."""
