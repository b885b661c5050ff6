#!/usr/bin/env bash
# Decide whether a training job resubmits itself, and do it.
#
# Usage (jobs/polaris.pbs and jobs/slurm.sbatch):
#   scripts/resubmit.sh --at-start
#   scripts/resubmit.sh [--dry-run] --exit-code RC [--stop-file PATH]
#                       [--vars "NAME ..."] [--] JOB_SCRIPT
#
#   --at-start         at job start: say in one line when this job cannot
#                      queue its successor (a PBS queue that holds one job per
#                      user, such as Polaris' debug-scaling), so the chain
#                      ends with it
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
#                      through qsub -v with their current values (Slurm jobs
#                      carry the whole environment)
#   --dry-run          print the submission instead of running it
#   JOB_SCRIPT         the job script to submit again
#
# The successor repeats every submission option of this job. PBS: -A, -q
# (the queue it was submitted to), -N, -j, -l select/place/walltime/
# filesystems and the -v variables, read from `qstat -f`. Slurm: the shape
# (--nodes, --ntasks-per-node, --cpus-per-task, --gpus-per-node), account,
# partition, QOS, name and time limit. After qsub/sbatch the new job is looked
# up with qstat/squeue: a job the scheduler accepted but does not hold (on
# Polaris a prod job that fits no execution queue vanishes so) is an error.
#
# Environment:
#   PRELORA_MAX_RESUBMITS  how many more times the chain may resubmit itself
#                          (default 20); the next job gets one less, so a
#                          failing setup cannot loop forever
#   PRELORA_SUBMIT_ARGS    more qsub/sbatch options for every resubmission,
#                          split at spaces (no quoting); they come last and win
#   PBS_JOBID / SLURM_JOB_ID  which scheduler to use; the next job waits for
#                          this one to end (afterany dependency)
#
# The decisions after the exit status are prelora_hpc.launch_plan.chain_main's.
#
# Exit status: 0 when the decision was made (resubmitted or not), 1 when the
# submission failed or the new job is not in the queue, 2 for bad usage.
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
die() { echo "resubmit.sh: $*" >&2; exit 2; }
say() { echo "resubmit.sh: $*"; }
# prelora_hpc.launch_plan.chain_main with the python beside prelora-train, else
# python3 and this checkout (it needs no third-party package).
chain() {
    local root py
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    if train=$(command -v prelora-train) && [ -x "$(dirname "$train")/python" ]; then
        py=$(dirname "$train")/python
    else
        py=python3
    fi
    PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} "$py" -c \
        'import sys; from prelora_hpc.launch_plan import chain_main; sys.exit(chain_main())' "$@"
}

EXIT_RESUBMIT=85 EXIT_CHECKPOINT_WRITE=74 EXIT_LOCKED=75 EXIT_INTERRUPTED=130
dry_run=0 dry_run_flag="" rc="" stop_file="" vars=""
while [ $# -gt 0 ]; do
    case "$1" in
        --at-start) chain check; exit 0 ;;
        --dry-run) dry_run=1 dry_run_flag=1 ;;
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
say "stopped on a walltime signal after a checkpoint: resubmitting ($next more allowed after this one)"
chain submit ${dry_run_flag:+--dry-run} --vars "$vars" --left "$next" "$script"
