"""Attribution quality against real retraining: one command per workload, each printing JSON and
writing a markdown table and a PNG plot under ``benchmarks/quality/results/``."""
