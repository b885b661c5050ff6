#!/usr/bin/env bash
# Turn the scheduler's environment into one launch line for prelora-train.
#
# Usage:
#   scripts/launch.sh [options] [--] CONFIG [prelora-train args...]
#
#   CONFIG                the run's YAML config (passed as --config CONFIG)
#   prelora-train args    anything prelora-train takes after the config:
#                         --output-dir DIR, --resume PATH, section.key=value
#
# Options:
#   --dry-run             print the command (and a comment line describing the
#                         layout) instead of running it
#   --np N                total ranks (default: nodes x ranks per node under a
#                         scheduler; $NP or 2 on a workstation)
#   --ppn N               ranks per node (default: PBS: the GPUs nvidia-smi
#                         lists, else 4; Slurm: SLURM_NTASKS_PER_NODE, else
#                         GPUs per node, else 1)
#   --depth D             CPUs per rank (PBS: mpiexec --depth under PALS,
#                         default 16; -bind-to core:D under Hydra, PE=D under
#                         Open MPI, no binding by default; Slurm: srun -c,
#                         default SLURM_CPUS_PER_TASK). A depth not above the
#                         config's data.num_workers gets a warning: the
#                         DataLoader workers then share the rank's cores.
#   --launcher L          mpiexec or srun (Slurm default: srun; elsewhere
#                         mpiexec, the only choice)
#   --no-nccl-env         PBS with GPUs: do not export the four NCCL_* settings
#                         for Slingshot, and unset them if the environment
#                         already has them (some DeepSpeed workloads hang with
#                         them); the FI_* libfabric settings stay
#   --stop-before S       signal the ranks (SIGTERM) S seconds before the job's
#                         walltime ends, so the trainer checkpoints and exits 85
#                         in time (default 300 under PBS, which has no early
#                         warning of its own; 0 elsewhere: Slurm jobs use
#                         #SBATCH --signal). 0 disables it.
#   -h, --help            show this help
#
# Where it runs decides the line, and under PBS also which MPI's mpiexec it
# is (`mpiexec --version`; PRELORA_MPI_FLAVOUR overrides):
#   PBS, Cray PALS (Polaris): mpiexec -n NODES*PPN --ppn PPN --depth=D
#       --cpu-bind depth --envall --hostfile $PBS_NODEFILE
#       scripts/gpu_affinity.sh prelora-train --config CONFIG ...
#   PBS, MPICH Hydra: mpiexec -n N -ppn PPN -hosts H1,H2,... [-bind-to core:D]
#       -envall scripts/gpu_affinity.sh prelora-train ...   (each host once:
#       the node file repeats a host per slot); on several hosts Hydra's
#       remote shell goes through scripts/node_watch.sh, which names a node
#       the job lost
#   PBS, Open MPI: mpiexec -n N --map-by ppr:PPN:node[:PE=D] --bind-to
#       core|none --hostfile $PBS_NODEFILE -x VAR... scripts/gpu_affinity.sh ...
#   Slurm (SLURM_JOB_ID set): srun --mpi=pmi2 -n N --ntasks-per-node PPN
#       --cpu-bind=cores [-c D] [--gpus-per-task=1 --gpu-bind=none]
#       prelora-train ...   (or mpiexec -n N --ppn PPN with --launcher mpiexec)
#   Otherwise: mpiexec -n NP prelora-train ...
#
# Environment read here (this script is launch code):
#   PRELORA_HSN_SUFFIX    appended to rank 0's short host name to form
#                         PRELORA_MASTER_ADDR, the address the trainer uses for
#                         its rendezvous; default under PBS
#                         ".hsn.cm.polaris.alcf.anl.gov" (Polaris' high-speed
#                         network; the management interface is much slower),
#                         empty elsewhere. Set it empty to use the name as the
#                         node file or Slurm lists it.
#                         The suffixed name is used only where it resolves
#                         (getent hosts); otherwise the node's own name.
#   PRELORA_MASTER_ADDR   left alone when already set
#   PRELORA_MPI_FLAVOUR   pals, hydra or openmpi: what mpiexec is, when
#                         `mpiexec --version` cannot tell (or to override it)
#   PRELORA_OFI_NCCL_DIR  (PBS with GPUs) the aws-ofi-nccl plugin's lib
#                         directory, put first on LD_LIBRARY_PATH; default:
#                         the newest /soft/libraries/aws-ofi-nccl/*/lib if
#                         the plugin is not on LD_LIBRARY_PATH already.
#                         NCCL_NET="AWS Libfabric" fails to initialise
#                         without it: a launch that finds none says so.
#   PRELORA_TMPDIR        (PBS) TMPDIR for the ranks (default /tmp: PBS'
#                         per-job directory makes DataLoader socket paths
#                         too long, "AF_UNIX path too long")
#   PRELORA_MPIEXEC       the mpiexec to use (default: the one installed next
#                         to prelora-train, e.g. PyPI's MPICH in a venv, else
#                         the first on PATH, e.g. Cray PALS on Polaris)
#   PRELORA_SRUN_MPI      srun's --mpi plugin (default pmi2; empty: the site's
#                         default, e.g. cray_shasta on Perlmutter)
#   NP                    ranks on a workstation when --np is not given
#
# The exit status is prelora-train's (through the launcher): 0 finished, 85
# stopped on a walltime signal after checkpointing (resubmit), else failure.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "launch.sh: $*" >&2; exit 2; }
note() { echo "launch.sh: $*" >&2; }
# A command as one line a shell reads back identically.
quoted() { printf '%q' "$1"; shift; [ $# -eq 0 ] || printf ' %q' "$@"; echo; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

dry_run=0 np="" ppn="" depth="" launcher="" nccl_env=1 stop_before=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --np) np=${2:?--np needs a value}; shift ;;
        --np=*) np=${1#*=} ;;
        --ppn) ppn=${2:?--ppn needs a value}; shift ;;
        --ppn=*) ppn=${1#*=} ;;
        --depth) depth=${2:?--depth needs a value}; shift ;;
        --depth=*) depth=${1#*=} ;;
        --launcher) launcher=${2:?--launcher needs a value}; shift ;;
        --launcher=*) launcher=${1#*=} ;;
        --no-nccl-env) nccl_env=0 ;;
        --stop-before) stop_before=${2:?--stop-before needs a value}; shift ;;
        --stop-before=*) stop_before=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
    shift
done
[ $# -ge 1 ] || die "missing CONFIG (usage: launch.sh [options] -- CONFIG [prelora-train args...])"
config=$1; shift

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for pair in "np:$np" "ppn:$ppn" "depth:$depth" "stop-before:$stop_before"; do
    v=${pair#*:}
    [ -z "$v" ] || is_uint "$v" || die "--${pair%%:*} must be a whole number, got '$v'"
done
for v in "$np" "$ppn" "$depth"; do
    [ "$v" != 0 ] || die "--np, --ppn and --depth must be > 0"
done
case "$launcher" in ""|mpiexec|srun) ;; *) die "--launcher must be mpiexec or srun, got '$launcher'" ;; esac

if [ ! -f "$config" ]; then
    [ "$dry_run" = 1 ] || die "config $config does not exist"
    note "warning: config $config does not exist here"
fi

# GPUs on this node: nvidia-smi lists one "GPU n: ..." line per device.
count_gpus() {
    command -v nvidia-smi >/dev/null 2>&1 || { echo 0; return; }
    nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true
}

# "HH:MM:SS", "MM:SS", "D-HH:MM:SS" or seconds -> seconds; nothing if unknown.
to_seconds() {
    local t=$1 d=0 h=0 m=0 s=0
    [[ $t =~ ^([0-9]+)-(.*)$ ]] && { d=${BASH_REMATCH[1]}; t=${BASH_REMATCH[2]}; }
    if [[ $t =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then
        h=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]} s=${BASH_REMATCH[3]}
    elif [[ $t =~ ^([0-9]+):([0-9]+)$ ]]; then
        m=${BASH_REMATCH[1]} s=${BASH_REMATCH[2]}
    elif [[ $t =~ ^([0-9]+)$ ]]; then
        s=${BASH_REMATCH[1]}
    else
        return 0
    fi
    echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

# Seconds left before the scheduler ends this job; nothing if unknown.
time_left() {
    case "$scheduler" in
        pbs)
            command -v qstat >/dev/null 2>&1 && [ -n "${PBS_JOBID:-}" ] || return 0
            local info walltime stime now elapsed used
            info=$(qstat -f "$PBS_JOBID" 2>/dev/null) || return 0
            walltime=$(to_seconds "$(awk '$1 == "Resource_List.walltime" {print $3}' <<<"$info")")
            [ -n "$walltime" ] || return 0
            # The job's start time gives the exact elapsed time; the
            # resources_used counter lags by MoM's update interval.
            stime=$(awk '$1 == "stime" {$1 = $2 = ""; print}' <<<"$info")
            now=$(date +%s)
            if [ -n "$stime" ] && stime=$(date -d "$stime" +%s 2>/dev/null); then
                elapsed=$(( now - stime ))
            else
                used=$(to_seconds "$(awk '$1 == "resources_used.walltime" {print $3}' <<<"$info")")
                elapsed=${used:-0}
            fi
            echo $(( walltime - elapsed ))
            ;;
        slurm)
            command -v squeue >/dev/null 2>&1 || return 0
            to_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)"
            ;;
    esac
}

# --- The program and the launchers -------------------------------------------
train=$(command -v prelora-train || true)
if [ -z "$train" ]; then
    [ "$dry_run" = 1 ] || die "prelora-train is not on PATH: activate the environment it is installed in"
    note "warning: prelora-train is not on PATH here"
    train=prelora-train
fi
# An mpiexec installed beside prelora-train belongs to the MPI its mpi4py was
# built with (PyPI's MPICH in a venv); otherwise take the site's.
mpiexec=${PRELORA_MPIEXEC:-}
if [ -z "$mpiexec" ]; then
    if [ "$train" != prelora-train ] && [ -x "$(dirname "$train")/mpiexec" ]; then
        mpiexec=$(dirname "$train")/mpiexec
    else
        mpiexec=$(command -v mpiexec || echo mpiexec)
    fi
fi

# Which MPI an mpiexec belongs to: pals (Cray PALS), hydra (MPICH, Intel
# MPI), openmpi; "unknown" if it does not say.
mpi_flavour() {
    if [ -n "${PRELORA_MPI_FLAVOUR:-}" ]; then
        case "$PRELORA_MPI_FLAVOUR" in
            pals|hydra|openmpi) echo "$PRELORA_MPI_FLAVOUR"; return ;;
            *) die "PRELORA_MPI_FLAVOUR must be pals, hydra or openmpi, got '$PRELORA_MPI_FLAVOUR'" ;;
        esac
    fi
    local version path
    version=$(timeout 20 "$mpiexec" --version 2>&1 | head -n 20 || true)
    path=$(readlink -f "$(command -v "$mpiexec" 2>/dev/null || echo "$mpiexec")" 2>/dev/null || echo "$mpiexec")
    if [[ $version == *HYDRA* || $version == *"Intel(R) MPI"* ]]; then echo hydra
    elif [[ $version == *"Open MPI"* || $version == *OpenRTE* || $version == *"open-mpi"* ]]; then echo openmpi
    elif [[ $version == *PALS* || $version == *pals* || $path == */pals/* ]]; then echo pals
    else echo unknown
    fi
}

# NAME resolves on this node.
resolves() {
    if command -v getent >/dev/null 2>&1; then
        getent hosts "$1" >/dev/null 2>&1
    else
        python3 -c 'import socket, sys; socket.gethostbyname(sys.argv[1])' "$1" >/dev/null 2>&1
    fi
}

# The run's data.num_workers (config file, then section.key=value overrides
# in the trainer's arguments); nothing when it cannot be read.
num_workers() {
    local py n=""
    py=$(dirname "$train")/python
    [ -x "$py" ] || py=$(command -v python3 || true)
    [ -n "$py" ] && [ -f "$config" ] || return 0
    n=$("$py" - "$config" "$@" 2>/dev/null <<'PY' || true
import sys
from prelora_hpc.config import load_config
overrides = [a for a in sys.argv[2:] if a.startswith("data.num_workers=")]
print(load_config(sys.argv[1], overrides).data.num_workers)
PY
)
    is_uint "$n" && echo "$n"
    return 0
}

# The aws-ofi-nccl plugin (libnccl-net*.so) on LD_LIBRARY_PATH: its directory.
ofi_nccl_on_path() {
    local d
    IFS=: read -r -a dirs <<<"${LD_LIBRARY_PATH:-}"
    for d in "${dirs[@]}"; do
        [ -n "$d" ] || continue
        compgen -G "$d/libnccl-net*.so*" >/dev/null && { echo "$d"; return 0; }
    done
    return 1
}

warnings=()
warn() { warnings+=("$*"); }

# --- Where are we -------------------------------------------------------------
if [ -n "${PBS_NODEFILE:-}" ]; then
    scheduler=pbs
elif [ -n "${SLURM_JOB_ID:-}" ]; then
    scheduler=slurm
else
    scheduler=local
fi

env_set=()      # NAME=value pairs exported for the ranks (shown by --dry-run)
export_env() { export "$1=$2"; env_set+=("$1=$2"); }
ngpu=0
layout=""

case "$scheduler" in
pbs)
    [ "$launcher" != srun ] || die "--launcher srun needs a Slurm job"
    [ -r "$PBS_NODEFILE" ] || die "PBS_NODEFILE=$PBS_NODEFILE is not readable"
    # PBS writes a host once per MPI slot; keep the first occurrence, in order.
    mapfile -t hosts < <(awk 'NF && !seen[$1]++ {print $1}' "$PBS_NODEFILE")
    nnodes=${#hosts[@]}
    [ "$nnodes" -gt 0 ] || die "PBS_NODEFILE=$PBS_NODEFILE lists no hosts"
    flavour=$(mpi_flavour)
    if [ "$flavour" = unknown ]; then
        # A PBS site whose mpiexec names no MPI is most likely Cray's: keep the
        # PALS line, and say how to choose another.
        warn "'$mpiexec --version' names none of Cray PALS, MPICH Hydra, Open MPI: using Cray PALS options (set PRELORA_MPI_FLAVOUR=pals|hydra|openmpi)"
        flavour=pals
    fi
    ngpu=$(count_gpus)
    if [ -z "$ppn" ]; then
        if [ "$ngpu" -gt 0 ]; then ppn=$ngpu; else ppn=4; fi
    fi
    # PALS binds by depth: 16 of a Polaris node's 64 hardware threads per
    # rank, room for the reference config's 8 DataLoader workers (ALCF's
    # example pairs --depth=16 with 8 workers). The others bind only when asked.
    [ "$flavour" != pals ] || depth=${depth:-16}
    np=${np:-$((nnodes * ppn))}
    # The trainer's rendezvous goes over the high-speed network where the node
    # has one under that name (Polaris); elsewhere over the node's own name.
    if [ -z "${PRELORA_MASTER_ADDR:-}" ]; then
        suffix=${PRELORA_HSN_SUFFIX-.hsn.cm.polaris.alcf.anl.gov}
        master=${hosts[0]}
        if [ -n "$suffix" ]; then
            if resolves "${hosts[0]%%.*}$suffix"; then
                master=${hosts[0]%%.*}$suffix
            else
                warn "${hosts[0]%%.*}$suffix does not resolve here: the rendezvous uses ${hosts[0]}"
            fi
        fi
        export_env PRELORA_MASTER_ADDR "$master"
    fi
    # DataLoader workers make AF_UNIX sockets under TMPDIR; PBS' per-job
    # directory makes their paths too long.
    export_env TMPDIR "${PRELORA_TMPDIR:-/tmp}"
    ofi_note=""
    if [ "$ngpu" -gt 0 ]; then
        # NCCL over Slingshot through the aws-ofi-nccl plugin; values already in
        # the environment (recent conda modules set them) are kept.
        if [ "$nccl_env" = 1 ]; then
            export_env NCCL_NET_GDR_LEVEL "${NCCL_NET_GDR_LEVEL:-PHB}"
            export_env NCCL_CROSS_NIC "${NCCL_CROSS_NIC:-1}"
            export_env NCCL_COLLNET_ENABLE "${NCCL_COLLNET_ENABLE:-1}"
            export_env NCCL_NET "${NCCL_NET:-AWS Libfabric}"
        else
            unset NCCL_NET_GDR_LEVEL NCCL_CROSS_NIC NCCL_COLLNET_ENABLE NCCL_NET
        fi
        export_env FI_CXI_DISABLE_HOST_REGISTER "${FI_CXI_DISABLE_HOST_REGISTER:-1}"
        export_env FI_MR_CACHE_MONITOR "${FI_MR_CACHE_MONITOR:-userfaultfd}"
        export_env FI_CXI_DEFAULT_CQ_SIZE "${FI_CXI_DEFAULT_CQ_SIZE:-131072}"
        if [ "${NCCL_NET:-}" = "AWS Libfabric" ]; then
            # NCCL loads the plugin (libnccl-net.so) from LD_LIBRARY_PATH and
            # fails to initialise without it when NCCL_NET names it.
            plugin=${PRELORA_OFI_NCCL_DIR:-}
            if [ -z "$plugin" ] && ! plugin=$(ofi_nccl_on_path); then
                plugin=$(compgen -G "/soft/libraries/aws-ofi-nccl/*/lib" | sort -V | tail -n 1 || true)
                plugin=${plugin:-}
            fi
            if [ -n "$plugin" ] && compgen -G "$plugin/libnccl-net*.so*" >/dev/null; then
                case ":${LD_LIBRARY_PATH:-}:" in
                    *":$plugin:"*) ;;
                    *) export_env LD_LIBRARY_PATH "$plugin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
                esac
                ofi_note=" ofi_nccl=$plugin"
            else
                ofi_note=" ofi_nccl=missing"
                warn "NCCL_NET=\"AWS Libfabric\" but no aws-ofi-nccl plugin (libnccl-net*.so) ${PRELORA_OFI_NCCL_DIR:+in $PRELORA_OFI_NCCL_DIR }on LD_LIBRARY_PATH: NCCL will fail to initialise; set PRELORA_OFI_NCCL_DIR to the plugin's lib directory, or --no-nccl-env"
            fi
        fi
    fi
    stop_before=${stop_before:-300}
    case "$flavour" in
    pals)
        cmd=("$mpiexec" -n "$np" --ppn "$ppn" "--depth=$depth" --cpu-bind depth --envall
             --hostfile "$PBS_NODEFILE")
        binding="depth:$depth"
        ;;
    hydra)
        cmd=("$mpiexec" -n "$np" -ppn "$ppn" -hosts "$(IFS=,; echo "${hosts[*]}")")
        if [ -n "$depth" ]; then cmd+=(-bind-to "core:$depth"); binding="core:$depth"; else binding=none; fi
        cmd+=(-envall)
        # Hydra reaches the other hosts through a remote shell (ssh unless
        # HYDRA_LAUNCHER says otherwise); node_watch.sh runs it and names a
        # node whose proxy dies, which Hydra does not.
        if [ "$nnodes" -gt 1 ] && [[ ${HYDRA_LAUNCHER:-ssh} =~ ^(ssh|rsh)$ ]] &&
           [ "${HYDRA_LAUNCHER_EXEC:-}" != "$here/node_watch.sh" ]; then
            export_env PRELORA_REMOTE_SHELL "${HYDRA_LAUNCHER_EXEC:-${HYDRA_LAUNCHER:-ssh}}"
            export_env PRELORA_JOB_HOSTS "${hosts[*]}"
            export_env PRELORA_JOB_PPN "$ppn"
            export_env HYDRA_LAUNCHER "${HYDRA_LAUNCHER:-ssh}"
            export_env HYDRA_LAUNCHER_EXEC "$here/node_watch.sh"
        fi
        ;;
    openmpi)
        if [ -n "$depth" ]; then
            cmd=("$mpiexec" -n "$np" --map-by "ppr:$ppn:node:PE=$depth" --bind-to core)
            binding="core:$depth"
        else
            cmd=("$mpiexec" -n "$np" --map-by "ppr:$ppn:node" --bind-to none)
            binding=none
        fi
        cmd+=(--hostfile "$PBS_NODEFILE")
        # Open MPI passes only the variables it is told to.
        for v in PATH LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV DS_ACCELERATOR "${env_set[@]%%=*}"; do
            [ -z "${!v+set}" ] || cmd+=(-x "$v")
        done
        ;;
    esac
    cmd+=("$here/gpu_affinity.sh" "$train" --config "$config" "$@")
    if [ -n "$depth" ]; then
        workers=$(num_workers "$@")
        if [ -n "$workers" ] && [ "$depth" -le "$workers" ]; then
            warn "--depth $depth is not above data.num_workers=$workers: each rank's DataLoader workers share its $depth core(s) with it (use a depth of at least $((workers + 1)))"
        fi
    fi
    layout="mpi=$flavour binding=$binding nccl_env=$([ "$ngpu" -gt 0 ] && { [ "$nccl_env" = 1 ] && echo on || echo off; } || echo n/a)$ofi_note"
    ;;
slurm)
    launcher=${launcher:-srun}
    if command -v scontrol >/dev/null 2>&1 && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else
        hosts=("$(hostname)")
    fi
    nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#hosts[@]}}}
    # Slurm's view of the GPUs it gave the job wins over what the node has.
    ngpu=${SLURM_GPUS_ON_NODE:-$(count_gpus)}
    is_uint "$ngpu" || ngpu=0
    if [ -z "$ppn" ]; then
        if is_uint "${SLURM_NTASKS_PER_NODE:-}"; then ppn=$SLURM_NTASKS_PER_NODE
        elif [ "$ngpu" -gt 0 ]; then ppn=$ngpu
        else ppn=1
        fi
    fi
    np=${np:-$((nnodes * ppn))}
    depth=${depth:-${SLURM_CPUS_PER_TASK:-}}
    if [ -z "${PRELORA_MASTER_ADDR:-}" ] && [ -n "${hosts[0]:-}" ]; then
        if [ -n "${PRELORA_HSN_SUFFIX:-}" ]; then
            export_env PRELORA_MASTER_ADDR "${hosts[0]%%.*}$PRELORA_HSN_SUFFIX"
        else
            export_env PRELORA_MASTER_ADDR "${hosts[0]}"
        fi
    fi
    stop_before=${stop_before:-0}
    if [ "$launcher" = srun ]; then
        srun=$(command -v srun || echo srun)
        cmd=("$srun")
        mpi=${PRELORA_SRUN_MPI-pmi2}
        [ -z "$mpi" ] || cmd+=("--mpi=$mpi")
        cmd+=(-n "$np" --ntasks-per-node "$ppn" --cpu-bind=cores)
        # srun no longer inherits --cpus-per-task from the job (Slurm 22.05+).
        [ -z "$depth" ] || cmd+=(-c "$depth")
        # One GPU per task for Slurm's bookkeeping, but every task sees all of
        # the node's GPUs so NCCL can use NVLink between them; the trainer
        # picks its device from its local rank.
        if [ "$ngpu" -gt 0 ] && [ "$ppn" -le "$ngpu" ]; then
            cmd+=(--gpus-per-task=1 --gpu-bind=none)
        fi
        layout="binding=cores${depth:+:$depth}"
    else
        # Hydra (MPICH) finds the allocation itself and starts its proxies
        # through srun.
        cmd=("$mpiexec" -n "$np" --ppn "$ppn")
        layout="binding=launcher-default"
    fi
    cmd+=("$train" --config "$config" "$@")
    ;;
local)
    [ "$launcher" != srun ] || die "--launcher srun needs a Slurm job"
    np=${np:-${NP:-2}}
    is_uint "$np" && [ "$np" -gt 0 ] || die "NP must be a whole number > 0, got '$np'"
    nnodes=1 ppn=$np
    ngpu=$(count_gpus)
    stop_before=${stop_before:-0}
    cmd=("$mpiexec" -n "$np" "$train" --config "$config" "$@")
    layout="binding=none"
    ;;
esac

# When to stop before the walltime ends (seconds from now), if asked and known.
stop_in=""
stop_note="stop_before=off"
if [ "$stop_before" -gt 0 ] && [ "$scheduler" != local ]; then
    left=$(time_left || true)
    if [ -n "$left" ]; then
        stop_in=$(( left - stop_before ))
        [ "$stop_in" -gt 0 ] || stop_in=1
        stop_note="stop_before=${stop_before}s (SIGTERM in ${stop_in}s)"
    else
        stop_note="stop_before=${stop_before}s (walltime unknown: relying on the scheduler's signal)"
    fi
fi

describe="# scheduler=$scheduler nodes=$nnodes ranks_per_node=$ppn ranks=$np gpus_per_node=$ngpu $layout master_addr=${PRELORA_MASTER_ADDR:-auto} $stop_note"
if [ "$dry_run" = 1 ]; then
    echo "$describe"
    [ ${#env_set[@]} -eq 0 ] || echo "# env: $(quoted "${env_set[@]}")"
    for w in "${warnings[@]}"; do echo "# warning: $w"; done
    quoted "${cmd[@]}"
    exit 0
fi

for w in "${warnings[@]}"; do note "warning: $w"; done
{ echo "$describe"; echo "+ $(quoted "${cmd[@]}")"; } >&2
if [ -z "$stop_in" ]; then
    exec "${cmd[@]}"
fi

# With a stop timer the launcher runs as a child: signals reaching this script
# are passed on, and the exit status is the launcher's.
"${cmd[@]}" &
child=$!
for sig in TERM USR1 INT HUP; do
    trap "kill -s $sig $child 2>/dev/null || true" "$sig"
done
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$stop_in" & sleeper=$!
    wait "$sleeper"
    note "walltime ends in ${stop_before}s: asking the trainer to checkpoint and stop"
    kill -TERM "$child" 2>/dev/null || true
) &
timer=$!
while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break
done
kill -TERM "$timer" 2>/dev/null || true
wait "$timer" 2>/dev/null || true
exit "$rc"
