#!/usr/bin/env bash
# The GPU check, on one CUDA device, in under 8 minutes:
#   1. the gpu-marked tests (bf16 engines, CUDA memory across rebuilds);
#   2. prelora-bench --preset vit-large on that device: stage 1, stage 3, the
#      no-adapter floor and the DDP peer (torch DDP + AdamW, autocast bf16),
#      bf16, written to docs/gpu_vit_large.json and docs/gpu_vit_large.md;
#   3. the same stage 1 and stage 3 with model.compile=true (the first step's
#      time is the compilation), docs/gpu_vit_large_compiled.{json,md}.
#
#   make venv && scripts/gpu_check.sh
#   VENV=/path/to/env OUT_DIR=/tmp/gpu scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
OUT_DIR=${OUT_DIR:-docs}
PY=$VENV/bin/python

if [[ ! -x $PY ]]; then
    echo "gpu_check: no Python environment at $VENV (run 'make venv', or set VENV)" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False in $VENV); nothing run" >&2
    exit 3
fi

# The Makefile defaults DeepSpeed to its CPU accelerator; this check is the GPU's.
export DS_ACCELERATOR=cuda
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$VENV" && pwd)/torch_extensions}
export PATH=$(cd "$VENV/bin" && pwd):$PATH
# One device: rank 0 of one, whatever the machine has.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
mkdir -p "$OUT_DIR"

"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'

# Budget: tests 3 min, eager bench 2.5 min, compiled bench 2.5 min; timeout
# turns a hang into a failure.
echo "gpu_check: gpu-marked tests"
timeout 180 "$PY" -m pytest -ra -m gpu tests

echo "gpu_check: prelora-bench --preset vit-large --peer ddp"
timeout 150 "$VENV/bin/mpiexec" -n 1 "$VENV/bin/prelora-bench" --preset vit-large --peer ddp \
    --json "$OUT_DIR/gpu_vit_large.json" --markdown "$OUT_DIR/gpu_vit_large.md"

echo "gpu_check: prelora-bench --preset vit-large, compiled"
timeout 150 "$VENV/bin/mpiexec" -n 1 "$VENV/bin/prelora-bench" --preset vit-large --no-floor \
    --steps 30 --json "$OUT_DIR/gpu_vit_large_compiled.json" \
    --markdown "$OUT_DIR/gpu_vit_large_compiled.md" model.compile=true

echo "gpu_check: wrote $OUT_DIR/gpu_vit_large{,_compiled}.{json,md}"
