#!/usr/bin/env bash
# The CIFAR-10 benchmark of docs/results.md: full training against PreLoRA on
# configs/cifar10.yaml, 2 MPI ranks, seed by seed.
#
#   scripts/compare_cifar10.sh DATA [prelora-compare options or section.key=value ...]
#
# DATA is the ImageFolder tarball (cifar10-trainval.tar.gz, docs/data.md
# says how to make one from the publisher's download) or its converted .h5.
# A tarball is unpacked and converted once, into $DATA_DIR/cifar10.h5.
#
# Two tables in $OUT, sharing the full-training runs:
#   compare.md   full vs prelora (criterion norm, Algorithm 1), seeds $SEEDS
#   update.md    full vs update and early, seeds $UPDATE_SEEDS:
#                update: criterion 'update', the layer-mean relative update
#                  of every module <= 28 % per window over the last 2 windows;
#                  on seed 0 that passes at window 7, where the norm test
#                  passes (27 % and 23 % there, 34 % one window earlier)
#                early: the norm test at tau 6, one window earlier on seeds
#                  whose window-6 change is under 6 % (0, 1 and 4 of
#                  docs/results.md): a second point of the switch-point
#                  trade-off
# Finished runs are kept (--reuse): an interrupted benchmark continues.
#
# Environment: OUT (runs/cifar10), SEEDS (0,1,2,3,4), UPDATE_SEEDS (0,1,2),
# DATA_DIR (data), NP (2), VENV (.venv); MPIEXEC ("mpiexec -ppn 1 -hosts
# a,b" runs each rank on its own node); TABLE_PREFIX names the tables
# (e.g. "nodes2_"); UPDATE_SEEDS= (empty) skips the second table.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: $0 cifar10-trainval.tar.gz|cifar10.h5 [prelora-compare args...]" >&2
    exit 2
fi
DATA="$1"; shift
BIN="${VENV:-.venv}/bin"
if [ -x "$BIN/prelora-compare" ]; then
    PATH="$(cd "$BIN" && pwd):$PATH"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
if [ ! -f "$DATA" ]; then
    echo "$0: no such file: $DATA" >&2
    exit 2
fi
case "$DATA" in
    *.h5) H5="$DATA" ;;
    *)
        DATA_DIR="${DATA_DIR:-data}"
        H5="$DATA_DIR/cifar10.h5"
        if [ ! -f "$H5" ]; then
            mkdir -p "$DATA_DIR"
            tar -xzf "$DATA" -C "$DATA_DIR"
            prelora-convert "$DATA_DIR/cifar10" "$H5"
        fi
        ;;
esac
OUT="${OUT:-runs/cifar10}"
common=(--config configs/cifar10.yaml --out "$OUT" --np "${NP:-2}" --reuse
        ${MPIEXEC:+--mpiexec "$MPIEXEC"} "data.path=$H5")
prelora-compare "${common[@]}" --table "${TABLE_PREFIX:-}compare" \
    --seeds "${SEEDS:-0,1,2,3,4}" --modes full,prelora "$@"
if [ -n "${UPDATE_SEEDS-0,1,2}" ]; then
    prelora-compare "${common[@]}" --table "${TABLE_PREFIX:-}update" \
        --seeds "${UPDATE_SEEDS:-0,1,2}" --modes full \
        --variant "update:prelora.criterion=update,prelora.tau_update=28" \
        --variant "early:prelora.tau=6" "$@"
fi
