#!/usr/bin/env bash
# full vs prelora vs lora on the embedded digits set, 2 MPI ranks on a CPU:
# the comparison behind docs/results.md.
#
#   scripts/compare.sh                                   # 3 seeds into runs/compare
#   SEEDS=0 OUT=/tmp/cmp scripts/compare.sh run.epochs=6 # later overrides win
#   scripts/compare.sh --reuse                           # finish an interrupted comparison
#
# Environment: SEEDS (default 0,1,2), OUT (runs/compare), NP (2 ranks), VENV (.venv).
# Arguments are passed on to prelora-compare: options or section.key=value.
#
# On top of configs/quickstart.yaml (whose 96-wide ViT only reaches ~50-65%
# top-1 in its 12 epochs), every mode gets the same:
#   model.img_size=16        4x4-pixel patches of the 16 px digit: 16 tokens
#   model.embed_dim=384      wide enough that the linear layers, not Python
#   model.num_heads=6        and the data loader, set the step time: stage 3's
#                            saving (no base weight gradients, no optimizer
#                            state for the base) is only visible where they do
#   run.epochs=20            full training reaches ~94% top-1 (7.1M params)
#   optim.lr=0.001           0.003 diverged on one seed in three; 44 warm-up
#   optim.warmup_steps=44    steps = 2 epochs
#   prelora.window_steps=epoch  one epoch per window: 5-step windows of 64
#                            images made the loss too noisy to test
#   prelora.tau=0.5          weights move < 0.5% per epoch, loss < 20% per epoch
#   prelora.zeta=20          (the training loss still falls ~10% per epoch while
#   prelora.k=3              the learning rate anneals): epoch 11-12 of 20.
#                            tau=1.0 switched at epoch 9-10 and lost 2.3 points
#   prelora.warmup_windows=1 one epoch of stage 2
#   prelora.r_min=8          ranks 8..32 for prelora's stage 3: r_max/width =
#   prelora.r_max=32         1/12, as 64/1024 for ViT-L; ranks 4..16 with
#                            tau=1.0 are the 2.3 points above
#   lora.rank=16             the lora baseline: rank 16 on every layer, about
#                            the mean rank of prelora's maps (same budget)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
if [ -x "$BIN/prelora-compare" ]; then
    PATH="$(pwd)/$BIN:$PATH"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec prelora-compare --config configs/quickstart.yaml --out "${OUT:-runs/compare}" \
    --seeds "${SEEDS:-0,1,2}" --np "${NP:-2}" \
    model.img_size=16 model.embed_dim=384 model.num_heads=6 run.epochs=20 \
    optim.lr=0.001 optim.warmup_steps=44 \
    prelora.window_steps=epoch prelora.tau=0.5 prelora.zeta=20 prelora.k=3 \
    prelora.warmup_windows=1 prelora.r_min=8 prelora.r_max=32 \
    lora.rank=16 "$@"
