#!/usr/bin/env bash
# GPU checks for issue 8 (run on a lent GPU machine, from the repository root, in well under
# 8 minutes): build throughput next to a plain training step for Pythia-70m- and 160m-shaped
# models in fp32 and bf16. Prints one JSON object per run; each names the GPU.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv
for shape in 70m 160m; do
  for precision in fp32 bf16; do
    python -m benchmarks.build --shape "$shape" --precision "$precision" --device cuda \
      --num_docs 1000 --repeats 2 --token_batch_size 8192
  done
done
# --fsdp on one GPU equals no FSDP; int4 / int8 (bitsandbytes, when installed) build
python -m benchmarks.gpu_checks --shape 70m --num_docs 64
