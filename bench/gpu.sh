#!/usr/bin/env bash
# GPT-2 (124M) training on one GPU of a machine as it comes: python3 with its own CUDA build of torch,
# perhaps without some pure-Python packages, no network. About 6-8 minutes on an H100 / H200, in two
# parts that also run one at a time (details in bench/train_gpu.py):
#
#   speed  tokens/s, MFU and peak memory at 64 x 1024, bf16, torch.compile: gpt2lab against transformers'
#          GPT2LMHeadModel (sdpa) on the same batches; evaluation memory at that batch; eager steps
#          through the chunked loss; the cost of train.deterministic, and whether it repeats bit for bit
#   train  torchrun --nproc_per_node=1 -m gpt2lab train with evaluation, a checkpoint, a stop and
#          --resume auto (NCCL, DDP over torch.compile, object collectives); checks the metrics log,
#          the final checkpoint, a falling loss and that nothing was recompiled
#
# First, the packages python3 lacks are unpacked from local wheels into DIR/pydeps (bench/pydeps.py).
#
# Usage: bench/gpu.sh [--out DIR] [speed] [train]      both parts by default; DIR: bench-out/gpu
#   PYTHON=python3        the interpreter
#   WHEELS=bench/wheels   the wheels bench/fetch_wheels.sh downloaded. That folder is git-ignored: to
#                         copy the repository to a GPU machine, fetch only that machine's Python
#                         (PYTHON_VERSIONS=3.12 bench/fetch_wheels.sh bench/wheels-3.12, about 38 MB),
#                         copy the folder along and run WHEELS=bench/wheels-3.12 bench/gpu.sh
#   SPEED_TIMEOUT=300, TRAIN_TIMEOUT=200
#                         seconds a part may take; past that it is stopped and counts as failed
#   REHEARSE=1            the same script on the CPU with toy models, float32 and the aot_eager
#                         compile backend (tests/test_bench_gpu.py): checks the script, not the numbers
# Writes DIR/speed.log, DIR/speed.json, DIR/train.log; the training run goes to DIR/run.
# Exit status 0 only when every part ran and passed its checks.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bench/gpu.sh [--out DIR] [speed] [train]"
DIR=bench-out/gpu
PARTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out)
      [ $# -ge 2 ] || { echo "gpu.sh: --out needs a directory; $usage" >&2; exit 2; }
      DIR="$2"
      shift 2
      ;;
    speed | train) PARTS+=("$1"); shift ;;
    -h | --help) sed -n '2,/^set -/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(speed train)
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-bench/wheels}"
REHEARSE_ARG=""
[ "${REHEARSE:-0}" = 1 ] && REHEARSE_ARG="--rehearse"
mkdir -p "$DIR" || exit 1
DIR="$(cd "$DIR" && pwd)"
export PYTHONUNBUFFERED=1

echo "== machine =="
date -u '+%Y-%m-%d %H:%M UTC'
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu.sh: no '$PY' here; set PYTHON to the interpreter that has torch" >&2
  exit 1
fi
if ! error=$("$PY" -c "import torch" 2>&1); then
  echo "gpu.sh: $PY cannot import torch (${error##*$'\n'}); install a CUDA build of torch for it, or set PYTHON" >&2
  exit 1
fi
"$PY" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())"
if [ -z "$REHEARSE_ARG" ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu.sh: torch sees no CUDA GPU here; REHEARSE=1 runs the script on the CPU with toy models" >&2
  exit 1
fi

echo "== dependencies =="
if ! "$PY" bench/pydeps.py --wheels "$WHEELS" --target "$DIR/pydeps" --pythonpath "$PWD/src" gpt2lab transformers; then
  echo "gpu.sh: the packages above are missing; nothing was run" >&2
  exit 1
fi
export PYTHONPATH="$DIR/pydeps:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

declare -A RESULT
run_part() {
  local part="$1" limit="$2" start=$SECONDS code
  shift 2
  echo "== $part (at most $limit s) =="
  # timeout signals its whole process group, torchrun's workers included.
  # shellcheck disable=SC2086  # REHEARSE_ARG is one word or nothing
  timeout --kill-after=20 "$limit" "$PY" bench/train_gpu.py "$part" "$@" $REHEARSE_ARG 2>&1 | tee "$DIR/$part.log"
  code=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  case "$code" in
    0) RESULT[$part]="ok (${took} s)" ;;
    124 | 137) RESULT[$part]="FAILED: no result within $limit s" ;;
    *) RESULT[$part]="FAILED: exit status $code after ${took} s" ;;
  esac
}

for part in "${PARTS[@]}"; do
  case "$part" in
    speed) run_part speed "${SPEED_TIMEOUT:-300}" --json "$DIR/speed.json" ;;
    train) run_part train "${TRAIN_TIMEOUT:-200}" --out "$DIR" ;;
  esac
done

echo "== summary =="
status=0
for part in "${PARTS[@]}"; do
  echo "$part: ${RESULT[$part]} (log: $DIR/$part.log)"
  [[ "${RESULT[$part]}" == ok* ]] || status=1
done
exit $status
