#!/usr/bin/env bash
# The prepared GPU check (issue 22; run on a lent GPU machine, from the repository root):
#   1. the numerics table for a Pythia-160M-shaped model (bf16 / fp32 / fp32+TF32 / bf16 with the
#      math SDP kernel): build tokens/s next to a plain training step, as ratios, and each build
#      against the card's 4·N·tokens FLOP ceiling;
#   2. --fsdp on one GPU equals an unsharded build; int4 / int8 (bitsandbytes) models build.
# Each prints one JSON object naming the GPU. The CPU parts run here with
#   python -m benchmarks.gpu_checks --device cpu --dry_run
#
# Time: under 10 minutes in all. The table is ~3.5 min by its FLOP count on an A100 and ~1.5 min on
# an H100/H200 (the estimate is in benchmarks/gpu_checks.py's docstring); its --budget_s 400 starts
# no row that would end past 400 s, and each command is wrapped in `timeout` (420 s + 150 s), so
# even a card slower than the estimate ends the script by 9.5 minutes with the rows it finished.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 420 python -m benchmarks.gpu_checks --no_checks --shape 160m --num_docs 512 --repeats 2 --budget_s 400
timeout 150 python -m benchmarks.gpu_checks --only_checks --shape 70m --num_docs 64
