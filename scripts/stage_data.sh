#!/usr/bin/env bash
# Stage a converted data set onto every node's local disk at job start: one
# copy per node, each verified (size and CRC-32) before it is used.
#
# Usage (jobs/polaris.pbs, when PRELORA_STAGE_DIR is set):
#   scripts/stage_data.sh SRC DEST_DIR
#
#   SRC        the .h5 file or shard directory written by prelora-convert
#   DEST_DIR   node-local directory (Polaris: /local/scratch); the copy is
#              DEST_DIR/<name of SRC> on each node
#
# One process per node through prelora-launch (--ppn 1), so every node copies
# from the shared file system at once. Exit status: 0 when every node holds a
# verified copy, else that of the launch (a node's one line says why).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: stage_data.sh SRC DEST_DIR" >&2; exit 2; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Eight cores of one NUMA domain are plenty for a copy; no walltime stop.
exec "$here/launch.sh" --ppn 1 --depth 8 --stop-before 0 --no-nccl-env -- \
    python3 "$here/stage_data.py" "$1" "$2"
