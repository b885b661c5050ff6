#!/bin/bash -l
# Build the venv the Polaris job templates activate, on top of a pinned conda
# module, and record the torch and DeepSpeed it is built on (the templates
# refuse to start when those change under it).
#
# Usage, from the repository root on a Polaris login node:
#   scripts/polaris_venv.sh [MODULE]       # default conda/2025-09-25
#
# The venv is venvs/<module with / as ->, e.g. venvs/conda-2025-09-25: one
# venv per module, so a new module never breaks a venv built on the old one.
# Nothing heavy is built: pip installs this package and the few pure-Python
# packages the module lacks; torch, DeepSpeed and mpi4py (built against Cray
# MPICH) stay the module's, and the script refuses if pip would replace them.
set -euo pipefail

module_name=${1:-conda/2025-09-25}
venv=venvs/${module_name//\//-}

module use /soft/modulefiles
module load "$module_name"
conda activate base
python -m venv --system-site-packages "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
if pip install --dry-run -e . 2>&1 | grep -E '^Would install' | grep -qE '(^| )(torch|deepspeed|mpi4py)-'; then
    echo "polaris_venv.sh: pip would replace the module's torch, DeepSpeed or mpi4py: $module_name does not meet setup.cfg's ranges; pick another module (module avail conda)" >&2
    exit 1
fi
pip install -e .
python scripts/venv_versions.py record "$venv"
echo "polaris_venv.sh: built $venv; the templates use it with PRELORA_CONDA_MODULE=$module_name"
