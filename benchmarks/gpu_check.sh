#!/usr/bin/env bash
# GPU readiness: CUDA/NCCL, a bundle epoch with AMP (bf16) against fp32, and the kernel DU step at B = 4096 and 16384.
# Run on a machine with CUDA after installing the package: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi not found"
python3 benchmarks/gpu_check.py
