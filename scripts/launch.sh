#!/usr/bin/env bash
# Start a program on every rank of the allocation this runs in: the job
# templates' launch step. The launch logic is prelora-launch's
# (prelora_hpc/launch_plan.py); this wrapper only finds it.
#
# Usage:
#   scripts/launch.sh [options] [--] CONFIG [prelora-train args...]
#   scripts/launch.sh [options] [--] PROGRAM [args...]
#
#   CONFIG                a run's YAML config (*.yaml, *.yml): the program is
#                         prelora-train --config CONFIG, followed by its args
#                         (--output-dir DIR, --resume PATH, section.key=value)
#   PROGRAM               any other command, e.g. prelora-bench --preset vit-large
#
# Options: those of prelora-launch (scripts/launch.sh --help lists them):
# --dry-run, --print, --np, --ppn, --depth, --launcher, --no-nccl-env,
# --stop-before, --local.
#
# prelora-launch is taken from PATH; without it, the package is run with the
# python beside prelora-train, else with python3 from this checkout.
#
# The exit status is the program's (through the launcher): 0 finished, 85
# stopped on a walltime signal after checkpointing (resubmit), 130
# interrupted, 2 a usage error, else failure.
set -euo pipefail

if launcher=$(command -v prelora-launch); then
    exec "$launcher" "$@"
fi
if train=$(command -v prelora-train) && [ -x "$(dirname "$train")/python" ]; then
    exec "$(dirname "$train")/python" -m prelora_hpc.launch_plan "$@"
fi
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} exec python3 -m prelora_hpc.launch_plan "$@"
