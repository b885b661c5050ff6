#!/usr/bin/env bash
# Per-rank wrapper: give each MPI rank one GPU, then become the command.
#
# Usage (scripts/launch.sh puts it in front of prelora-train under PBS):
#   mpiexec ... scripts/gpu_affinity.sh prelora-train --config ...
#
# Rank with local rank L on a node with N GPUs gets
#   CUDA_VISIBLE_DEVICES = N-1 - L % N
# On Polaris the reverse order follows the CPU-GPU topology: prelora-launch
# binds local rank r to NUMA domain r, whose cores are next to GPU 3-r.
# It has to happen here, before the process starts: CUDA and MPI read the
# variable when they initialize, too early for Python to change it.
#
# Nothing changes when the node has no GPU (no nvidia-smi), when the launcher
# gives no local rank, or when CUDA_VISIBLE_DEVICES is already set (even to
# an empty value): the user's choice wins.

[ $# -gt 0 ] || { echo "usage: gpu_affinity.sh COMMAND [ARGS...]" >&2; exit 2; }

if [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    # Cray PALS / Hydra, PALS, Slurm, Open MPI, Intel MPI.
    local_rank=${PMI_LOCAL_RANK:-${PALS_LOCAL_RANKID:-${SLURM_LOCALID:-${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-}}}}}
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
    if [[ $local_rank =~ ^[0-9]+$ ]] && [[ $ngpu =~ ^[0-9]+$ ]] && [ "$ngpu" -gt 0 ]; then
        export CUDA_VISIBLE_DEVICES=$(( ngpu - 1 - local_rank % ngpu ))
    fi
fi
exec "$@"
