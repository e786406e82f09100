#!/usr/bin/env bash
# GPU benchmark for one H100 / H200 (about 6-8 minutes): GPT-2 (124M), T=1024, bf16, torch.compile.
#   1. tokens/s and MFU, gpt2lab vs transformers' GPT2LMHeadModel (sdpa), same step, same process
#   2. 200 steps of `gpt2lab train` (the 124M recipe at 64K tokens/step) on an offline corpus: loss falls
# Usage: bench/gpu.sh [OUT_DIR]      (OUT_DIR defaults to bench-out/; it gets the run and curve.png)
# On a machine without a GPU, `DEVICE=cpu TINY=--tiny bench/gpu.sh` runs the same steps with a toy model.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-bench-out}"
DEVICE="${DEVICE:-cuda}"
TINY="${TINY:-}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== throughput =="
"$PY" bench/train_gpu.py throughput --device "$DEVICE" $TINY | tee "$OUT/throughput.txt"
echo "== 200-step loss curve =="
rm -rf "$OUT/curve"
"$PY" bench/train_gpu.py curve --device "$DEVICE" --out "$OUT/curve" $TINY | tee "$OUT/curve.txt"
