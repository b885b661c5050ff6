#!/usr/bin/env bash
# full vs prelora at equal budget on the quick start (configs/quickstart.yaml,
# the embedded digits set, 2 MPI ranks on a CPU): the comparison behind
# docs/results.md and the README's numbers.
#
#   scripts/compare.sh                                   # 5 seeds into runs/compare
#   SEEDS=0 OUT=/tmp/cmp scripts/compare.sh run.epochs=6 # later overrides win
#   scripts/compare.sh --reuse                           # finish an interrupted comparison
#
# Environment: SEEDS (default 0,1,2,3,4), OUT (runs/compare), NP (2 ranks),
# MODES (full,prelora), VENV (.venv).
# Arguments are passed on to prelora-compare: options or section.key=value.
#
# Arms, each seed by seed against full:
#   prelora   the quick start as it is: criterion 'norm' (Algorithm 1)
#   update    criterion 'update': the layer-mean relative update of every
#             module <= 12 % per epoch over the last 2 windows. The update
#             shrinks with the annealing learning rate (about 13 % per epoch
#             at epoch 13-14 of 30, 6 % at 20, 0.2 % at 30 on seed 0), so
#             12 % places the switch near the norm test's, about epoch 15.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
if [ -x "$BIN/prelora-compare" ]; then
    PATH="$(cd "$BIN" && pwd):$PATH"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec prelora-compare --config configs/quickstart.yaml --out "${OUT:-runs/compare}" \
    --seeds "${SEEDS:-0,1,2,3,4}" --np "${NP:-2}" --modes "${MODES:-full,prelora}" \
    --variant "update:prelora.criterion=update,prelora.tau_update=12" "$@"
