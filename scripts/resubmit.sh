#!/usr/bin/env bash
# Decide whether a training job resubmits itself, and do it.
#
# Usage (the last step of jobs/polaris.pbs and jobs/slurm.sbatch):
#   scripts/resubmit.sh [--dry-run] --exit-code RC [--stop-file PATH]
#                       [--vars "NAME ..."] [--] JOB_SCRIPT
#
#   --exit-code RC     prelora-train's exit status. Only 85 (stopped on a
#                      walltime signal after writing a checkpoint) resubmits;
#                      0 (finished), 130 (stopped by Ctrl-C), 74 (a checkpoint
#                      could not be written: no space left), 75 (the run
#                      directory is in use by another run) and anything else (a
#                      failure, which a rerun would repeat) do not.
#   --stop-file PATH   if PATH exists, do not resubmit this once, and remove it
#                      (touch RUN_DIR/NO_RESUBMIT before qdel/scancel to end a
#                      chain: the trainer checkpoints on those signals too)
#   --vars "NAME ..."  PBS: environment variables the next job gets again
#                      through qsub -v (Slurm jobs carry the whole environment)
#   --dry-run          print the submission instead of running it
#   JOB_SCRIPT         the job script to submit again
#
# Environment:
#   PRELORA_MAX_RESUBMITS  how many more times the chain may resubmit itself
#                          (default 20); the next job gets one less, so a
#                          failing setup cannot loop forever
#   PRELORA_SUBMIT_ARGS    qsub/sbatch options every resubmission repeats,
#                          split at spaces (no quoting), e.g. a queue or a
#                          resource override given on the first command line
#   PBS_JOBID / SLURM_JOB_ID  which scheduler to use; the next job waits for
#                          this one to end (afterany dependency)
#
# On Slurm the job's shape is repeated from its own environment (--nodes,
# --ntasks-per-node, --cpus-per-task, --gpus-per-node when Slurm set them), so
# a run resumed with another world size cannot happen by accident; anything
# else given on the first sbatch line belongs in PRELORA_SUBMIT_ARGS.
#
# Exit status: 0 when the decision was made (resubmitted or not), 1 when the
# submission itself failed, 2 for bad usage.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "resubmit.sh: $*" >&2; exit 2; }
say() { echo "resubmit.sh: $*"; }
quoted() { printf '%q' "$1"; shift; [ $# -eq 0 ] || printf ' %q' "$@"; echo; }

EXIT_RESUBMIT=85 EXIT_CHECKPOINT_WRITE=74 EXIT_LOCKED=75 EXIT_INTERRUPTED=130
dry_run=0 rc="" stop_file="" vars=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --exit-code) rc=${2?--exit-code needs a value}; shift ;;
        --exit-code=*) rc=${1#*=} ;;
        --stop-file) stop_file=${2?--stop-file needs a value}; shift ;;
        --stop-file=*) stop_file=${1#*=} ;;
        --vars) vars=${2?--vars needs a value}; shift ;;
        --vars=*) vars=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
    shift
done
[ $# -eq 1 ] || die "expected one JOB_SCRIPT after the options"
script=$1
[[ $rc =~ ^[0-9]+$ ]] || die "--exit-code must be a whole number, got '$rc'"

if [ "$rc" -ne "$EXIT_RESUBMIT" ]; then
    if [ "$rc" -eq 0 ]; then
        say "training finished (exit 0): no resubmission"
    elif [ "$rc" -eq "$EXIT_CHECKPOINT_WRITE" ]; then
        say "a checkpoint could not be written (exit $rc, e.g. no space left on the run directory's file system): no resubmission; free space, then submit again (the run resumes from its last complete checkpoint)"
    elif [ "$rc" -eq "$EXIT_LOCKED" ]; then
        say "the run directory is in use by another run (exit $rc): no resubmission"
    elif [ "$rc" -eq "$EXIT_INTERRUPTED" ]; then
        say "stopped by an interrupt after a checkpoint (exit $rc): no resubmission"
    else
        say "training failed (exit $rc): no resubmission; fix the cause, then submit again (the run resumes from its last checkpoint)"
    fi
    exit 0
fi

if [ -n "$stop_file" ] && [ -e "$stop_file" ]; then
    say "stopped on a walltime signal, but $stop_file exists: no resubmission (file removed)"
    [ "$dry_run" = 1 ] || rm -f -- "$stop_file"
    exit 0
fi

left=${PRELORA_MAX_RESUBMITS:-20}
[[ $left =~ ^[0-9]+$ ]] || die "PRELORA_MAX_RESUBMITS must be a whole number, got '$left'"
if [ "$left" -le 0 ]; then
    say "stopped on a walltime signal, but the resubmission limit is reached (PRELORA_MAX_RESUBMITS=0): submit $script again by hand to continue"
    exit 0
fi
next=$((left - 1))

[ -f "$script" ] || die "job script $script does not exist"
read -r -a extra <<<"${PRELORA_SUBMIT_ARGS:-}"

if [ -n "${PBS_JOBID:-}" ]; then
    # qsub -v takes NAME=value pairs separated by commas; a value holding a
    # comma is quoted.
    list="PRELORA_MAX_RESUBMITS=$next"
    for name in $vars PRELORA_SUBMIT_ARGS; do
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--vars: '$name' is not a variable name"
        [ -n "${!name+set}" ] || continue
        value=${!name}
        if [[ $value == *,* ]]; then
            [[ $value != *\'* ]] || die "cannot pass $name to qsub -v: its value holds both a comma and a quote"
            value="'$value'"
        fi
        list+=",$name=$value"
    done
    cmd=(qsub -W "depend=afterany:$PBS_JOBID" ${extra[@]+"${extra[@]}"} -v "$list" "$script")
elif [ -n "${SLURM_JOB_ID:-}" ]; then
    shape=(--nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}")
    [ -z "${SLURM_NTASKS_PER_NODE:-}" ] || shape+=(--ntasks-per-node="$SLURM_NTASKS_PER_NODE")
    [ -z "${SLURM_CPUS_PER_TASK:-}" ] || shape+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    [ -z "${SLURM_GPUS_PER_NODE:-}" ] || shape+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
    cmd=(sbatch --dependency="afterany:$SLURM_JOB_ID" "${shape[@]}" ${extra[@]+"${extra[@]}"}
         --export="ALL,PRELORA_MAX_RESUBMITS=$next" "$script")
else
    die "not inside a PBS or Slurm job (neither PBS_JOBID nor SLURM_JOB_ID is set)"
fi

say "stopped on a walltime signal after a checkpoint: resubmitting ($next more allowed after this one)"
if [ "$dry_run" = 1 ]; then
    quoted "${cmd[@]}"
    exit 0
fi
echo "+ $(quoted "${cmd[@]}")"
if ! out=$("${cmd[@]}" 2>&1); then
    say "submission failed: $out" >&2
    exit 1
fi
say "submitted: $out"
