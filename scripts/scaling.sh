#!/usr/bin/env bash
# Weak and strong scaling of stage 1 (full) and stage 3 (LoRA only) with
# prelora-bench: one JSON row per (scaling, stage, rank count) for
# `prelora-report scaling DIR`.
#
# Usage:
#   scripts/scaling.sh --local [options] [-- prelora-bench args...]
#   scripts/scaling.sh --submit pbs|slurm [options] [-- prelora-bench args...]
#   scripts/scaling.sh --in-job [options] [-- prelora-bench args...]
#
#   --local               run here, one `prelora-launch --local --np N --
#                         prelora-bench ...` per rank count N = 1, 2, 4, ...
#                         up to --max-ranks
#   --submit pbs|slurm    write one job per node count (--nodes) into
#                         OUT/jobs/ and submit it with qsub or sbatch; each
#                         job calls this script with --in-job
#   --in-job              inside a PBS or Slurm allocation: every rank of it
#                         (nodes x --ppn), launched by scripts/launch.sh
#                         (prelora-launch) as the job templates launch
#
# Options:
#   --preset P            prelora-bench preset (default: cpu-small with
#                         --local, vit-large otherwise)
#   --out DIR             rows, full results and logs (default runs/scaling)
#   --max-ranks N         --local: the largest rank count (default 2)
#   --nodes "1 2 4 ..."   --submit: node counts (default 1 2 4 ... 512)
#   --ppn N               ranks per node under a scheduler (default 4)
#   --depth D             PBS: CPUs per rank for mpiexec --depth (default 8);
#                         Slurm: srun -c (default: the job's)
#   --per-gpu-batch B     weak scaling: images per rank per step (default:
#                         the preset's micro batch, read from its YAML,
#                         prelora_hpc/bench/presets/NAME.yaml)
#   --global-batch G      strong scaling: images per step over all ranks
#                         (default: B x the smallest rank count of the
#                         series); counts that do not divide G are skipped
#   --scalings "weak strong"   which series (default both)
#   --stages "1 3"        which stages (default both; one bench process runs
#                         both, stage 3 first)
#   --steps N, --warmup N passed to prelora-bench
#   --account A, --queue Q, --walltime T   --submit: the job's account,
#                         queue (PBS default by size: debug up to 2 nodes,
#                         debug-scaling up to 10, prod above; Slurm: none)
#                         and walltime (default 00:30:00)
#   --setup CMDS          --submit: shell lines run in the job before the
#                         bench (PBS default: Polaris' conda module)
#   --venv DIR            --submit: a venv the job activates after --setup
#   --dry-run             --submit: write the jobs and print the submit
#                         commands without submitting; --in-job/--local:
#                         print the launch lines only (prelora-launch --print)
#   -h, --help            show this help
#
# Rows: OUT/<scaling>-<stage>-n<ranks>.json, each one JSON object with
# exactly the keys stage, scaling, nodes, gpus, global_batch, images_per_s,
# images_per_s_per_gpu, step_time_s, allreduce_bytes_per_step,
# peak_memory_bytes, device. Full results: OUT/bench-<scaling>-n<ranks>.json.
#
# Each point is one scripts/launch.sh (prelora-launch) line, the job
# templates' launch: under PBS mpiexec (Cray PALS, MPICH Hydra or Open MPI
# options) with scripts/gpu_affinity.sh, under Slurm srun; the rendezvous
# address and the ranks' environment as prelora-launch --help says. The
# PBS stop timer is off (--stop-before 0): a bench writes no checkpoint.
#
# Environment: PRELORA_BENCH (the prelora-bench to run; default the one on
# PATH); what prelora-launch reads (PRELORA_MPIEXEC, PRELORA_MPI_FLAVOUR,
# PRELORA_HSN_SUFFIX, PRELORA_SRUN_MPI, ...).
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "scaling.sh: $*" >&2; exit 2; }
note() { echo "scaling.sh: $*" >&2; }
quoted() { printf '%q' "$1"; shift; [ $# -eq 0 ] || printf ' %q' "$@"; echo; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

mode="" scheduler="" preset="" out=runs/scaling max_ranks=2
nodes_list="1 2 4 8 16 32 64 128 256 512" ppn="" depth="" per_gpu_batch="" global_batch=""
scalings="weak strong" stages="1 3" steps="" warmup="" account="" queue=""
walltime=00:30:00 setup="__default__" venv="" dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --local) mode=local ;;
        --submit) mode=submit; scheduler=${2:?--submit needs pbs or slurm}; shift ;;
        --in-job) mode=in-job ;;
        --preset) preset=${2:?--preset needs a value}; shift ;;
        --out) out=${2:?--out needs a value}; shift ;;
        --max-ranks) max_ranks=${2:?--max-ranks needs a value}; shift ;;
        --nodes) nodes_list=${2:?--nodes needs a value}; shift ;;
        --ppn) ppn=${2:?--ppn needs a value}; shift ;;
        --depth) depth=${2:?--depth needs a value}; shift ;;
        --per-gpu-batch) per_gpu_batch=${2:?--per-gpu-batch needs a value}; shift ;;
        --global-batch) global_batch=${2:?--global-batch needs a value}; shift ;;
        --scalings) scalings=${2:?--scalings needs a value}; shift ;;
        --stages) stages=${2:?--stages needs a value}; shift ;;
        --steps) steps=${2:?--steps needs a value}; shift ;;
        --warmup) warmup=${2:?--warmup needs a value}; shift ;;
        --account) account=${2:?--account needs a value}; shift ;;
        --queue) queue=${2:?--queue needs a value}; shift ;;
        --walltime) walltime=${2:?--walltime needs a value}; shift ;;
        --setup) setup=${2?--setup needs a value}; shift ;;
        --venv) venv=${2:?--venv needs a value}; shift ;;
        --dry-run) dry_run=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
extra=("$@")

[ -n "$mode" ] || die "give one of --local, --submit pbs|slurm, --in-job (see --help)"
case "$scheduler" in ""|pbs|slurm) ;; *) die "--submit takes pbs or slurm, got '$scheduler'" ;; esac
for pair in "max-ranks:$max_ranks" "ppn:$ppn" "depth:$depth" "per-gpu-batch:$per_gpu_batch" \
            "global-batch:$global_batch" "steps:$steps" "warmup:$warmup"; do
    v=${pair#*:}
    [ -z "$v" ] || { is_uint "$v" && [ "$v" -gt 0 ]; } || die "--${pair%%:*} must be a whole number > 0, got '$v'"
done
for n in $nodes_list; do
    is_uint "$n" && [ "$n" -gt 0 ] || die "--nodes must list whole numbers > 0, got '$n'"
done
for s in $scalings; do
    case "$s" in weak|strong) ;; *) die "--scalings takes weak and/or strong, got '$s'" ;; esac
done
for s in $stages; do
    case "$s" in 1|3) ;; *) die "--stages takes 1 and/or 3, got '$s'" ;; esac
done
[ -n "$scalings" ] && [ -n "$stages" ] || die "--scalings and --stages must not be empty"

if [ -z "$preset" ]; then
    if [ "$mode" = local ]; then preset=cpu-small; else preset=vit-large; fi
fi
bench=${PRELORA_BENCH:-$(command -v prelora-bench || true)}
if [ -z "$bench" ]; then
    [ "$dry_run" = 1 ] || [ "$mode" = submit ] \
        || die "prelora-bench is not on PATH: activate the environment it is installed in"
    bench=prelora-bench
fi
if [ -z "$per_gpu_batch" ]; then
    # The preset's micro batch, read by the bench's own load_preset; its
    # module alone, since importing the bench package loads torch (seconds).
    py=$(dirname "$(command -v "$bench" || echo "$bench")")/python
    [ -x "$py" ] || py=python3
    per_gpu_batch=$(PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} "$py" - "$preset" <<'PY'
import importlib.util
import sys

bench = importlib.util.find_spec("prelora_hpc.bench").submodule_search_locations[0]
spec = importlib.util.spec_from_file_location("prelora_hpc.bench.presets", f"{bench}/presets.py")
presets = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(presets)
from prelora_hpc.config import ConfigError, load_config
try:
    overrides = list(presets.load_preset(sys.argv[1]).overrides)
    print(load_config(None, overrides).deepspeed.micro_batch_size)
except ConfigError as e:
    sys.exit(f"scaling.sh: {e}; or give --per-gpu-batch")
PY
) || exit 2
fi
ppn=${ppn:-4}
stage_csv=$(echo $stages | tr ' ' ',')

# Strong scaling keeps the global batch of the smallest run of the series.
smallest_ranks() {
    case "$mode" in
        local) echo 1 ;;
        submit) echo $(( $(printf '%s\n' $nodes_list | sort -n | head -n 1) * ppn )) ;;
        in-job) echo "$1" ;;
    esac
}

# One launch line a point, with the options given for the allocation.
launch_opts=(--stop-before 0)

# prelora-bench's arguments for one (scaling, ranks) run.
bench_args() {
    local scaling=$1 ranks=$2 gb=$3
    # A point times what its rows need: no floor, no interleaved round.
    local a=(--preset "$preset" --stages "$stage_csv" --scaling-row "$scaling"
             --json-row-dir "$out" --json "$out/bench-$scaling-n$ranks.json"
             --no-floor --no-interleave)
    if [ "$scaling" = weak ]; then a+=(--micro-batch "$per_gpu_batch"); else a+=(--global-batch "$gb"); fi
    [ -z "$steps" ] || a+=(--steps "$steps")
    [ -z "$warmup" ] || a+=(--warmup "$warmup")
    printf '%s\n' "${a[@]}" "${extra[@]}"
}

failures=0

# Run (or print) one point's launch line; check its rows appeared.
run_one() {
    local scaling=$1 ranks=$2; shift 2
    local log="$out/logs/$scaling-n$ranks.log"
    if [ "$dry_run" = 1 ]; then
        "$here/launch.sh" "${launch_opts[@]}" --print -- "$@" || exit $?
        return 0
    fi
    note "$scaling scaling, $ranks rank(s): $(quoted "$@")"
    local rc=0
    "$here/launch.sh" "${launch_opts[@]}" -- "$@" >"$log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then
        note "failed (exit $rc), last lines of $log:"; tail -n 20 "$log" >&2
        failures=$((failures + 1)); return 0
    fi
    for s in $stages; do
        [ -f "$out/$scaling-$s-n$ranks.json" ] || { note "missing row $out/$scaling-$s-n$ranks.json"; failures=$((failures + 1)); }
    done
}

# The series for a given rank count: every scaling asked, skipping strong
# scaling where the global batch does not split evenly.
run_series() {
    local ranks=$1
    for scaling in $scalings; do
        local gb=$global_batch
        if [ "$scaling" = strong ]; then
            gb=${gb:-$(( per_gpu_batch * $(smallest_ranks "$ranks") ))}
            if [ $(( gb % ranks )) -ne 0 ]; then
                note "strong scaling: global batch $gb does not split over $ranks ranks; skipped"
                continue
            fi
        fi
        mapfile -t args < <(bench_args "$scaling" "$ranks" "${gb:-0}")
        run_one "$scaling" "$ranks" "$bench" "${args[@]}"
    done
}

mkdir -p "$out/logs"

case "$mode" in
local)
    r=1
    counts=()
    while [ "$r" -le "$max_ranks" ]; do counts+=("$r"); r=$((r * 2)); done
    [ "${counts[-1]}" = "$max_ranks" ] || counts+=("$max_ranks")
    for n in "${counts[@]}"; do
        launch_opts=(--stop-before 0 --local --np "$n")
        run_series "$n"
    done
    ;;
in-job)
    launch_opts+=(--ppn "$ppn")
    layout=$("$here/launch.sh" "${launch_opts[@]}" --layout) || exit $?
    scheduler=local ranks=0
    for kv in $layout; do
        case "$kv" in scheduler=*) scheduler=${kv#*=} ;; ranks=*) ranks=${kv#*=} ;; esac
    done
    [ "$scheduler" != local ] \
        || die "--in-job needs a PBS (PBS_NODEFILE) or Slurm (SLURM_JOB_ID) allocation"
    [ "$scheduler" != pbs ] || depth=${depth:-8}
    [ -z "$depth" ] || launch_opts+=(--depth "$depth")
    note "# $layout"
    run_series "$ranks"
    ;;
submit)
    mkdir -p "$out/jobs"
    min_nodes=$(printf '%s\n' $nodes_list | sort -n | head -n 1)
    gb=${global_batch:-$(( per_gpu_batch * min_nodes * ppn ))}
    if [ "$setup" = __default__ ]; then
        if [ "$scheduler" = pbs ]; then
            setup="module use /soft/modulefiles; module load conda; conda activate base"
        else
            setup=""
        fi
    fi
    for n in $nodes_list; do
        job="$out/jobs/scaling-n$n.$([ "$scheduler" = pbs ] && echo pbs || echo sbatch)"
        inner=(scripts/scaling.sh --in-job --preset "$preset" --out "$out" --ppn "$ppn"
               --per-gpu-batch "$per_gpu_batch" --global-batch "$gb"
               --scalings "$scalings" --stages "$stages")
        [ -z "$depth" ] || inner+=(--depth "$depth")
        [ -z "$steps" ] || inner+=(--steps "$steps")
        [ -z "$warmup" ] || inner+=(--warmup "$warmup")
        [ ${#extra[@]} -eq 0 ] || inner+=(-- "${extra[@]}")
        {
            if [ "$scheduler" = pbs ]; then
                q=$queue
                if [ -z "$q" ]; then
                    if [ "$n" -le 2 ]; then q=debug; elif [ "$n" -le 10 ]; then q=debug-scaling; else q=prod; fi
                fi
                echo "#!/bin/bash -l"
                echo "# prelora-bench scaling rows on $n node(s); written by scripts/scaling.sh"
                echo "#PBS -A ${account:-YOUR_PROJECT}"
                echo "#PBS -q $q"
                echo "#PBS -l select=$n:system=polaris"
                echo "#PBS -l place=scatter"
                echo "#PBS -l walltime=$walltime"
                echo "#PBS -l filesystems=home:eagle"
                echo "#PBS -j oe"
                echo "#PBS -N prelora-scaling-n$n"
                echo 'cd "${PRELORA_ROOT:-${PBS_O_WORKDIR:-$PWD}}" || exit 1'
            else
                echo "#!/bin/bash"
                echo "# prelora-bench scaling rows on $n node(s); written by scripts/scaling.sh"
                [ -z "$account" ] || echo "#SBATCH -A $account"
                [ -z "$queue" ] || echo "#SBATCH -q $queue"
                echo "#SBATCH -C gpu"
                echo "#SBATCH --nodes=$n"
                echo "#SBATCH --ntasks-per-node=$ppn"
                echo "#SBATCH --gpus-per-node=$ppn"
                echo "#SBATCH --cpus-per-task=${depth:-32}"
                echo "#SBATCH -t $walltime"
                echo "#SBATCH -J prelora-scaling-n$n"
                echo "#SBATCH -o $out/logs/slurm-n$n-%j.out"
                echo 'cd "${PRELORA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}" || exit 1'
            fi
            [ -z "$setup" ] || echo "$setup"
            [ -z "$venv" ] || echo "source $(printf '%q' "$venv")/bin/activate || exit 1"
            quoted "${inner[@]}"
        } >"$job"
        if [ "$scheduler" = pbs ]; then submit=(qsub "$job"); else submit=(sbatch "$job"); fi
        if [ "$dry_run" = 1 ]; then
            echo "# $job"
            quoted "${submit[@]}"
        else
            note "$(quoted "${submit[@]}")"
            "${submit[@]}"
        fi
    done
    exit 0
    ;;
esac

if [ "$failures" -gt 0 ]; then
    note "$failures run(s) failed or left rows missing; see $out/logs/"
    exit 1
fi
[ "$dry_run" = 1 ] || note "rows in $out/ (prelora-report scaling $out)"
