#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for the tests and for
# trying jobs/slurm.sbatch before spending an allocation.
#
# Usage:
#   tests/slurm/cluster.sh start    install Slurm and munge if missing, write
#                                   slurm.conf for this machine, start munged,
#                                   slurmctld and slurmd, wait for the node to
#                                   be idle (a no-op when already up; after
#                                   a stop, or a crash, the cluster starts
#                                   without jobs, and job ids keep counting)
#   tests/slurm/cluster.sh stop     cancel every job of the cluster and stop
#                                   the three daemons (a no-op when stopped)
#   tests/slurm/cluster.sh status   say whether it is up (exit 0) or not (1)
#   tests/slurm/cluster.sh env      print the line that points the Slurm
#                                   commands at this cluster:
#                                     eval "$(tests/slurm/cluster.sh env)"
#
# Needs root (slurmd starts jobs as their owner) and, unless Slurm and munge
# are installed already, a Debian-like system whose apt can fetch
#   slurmctld slurmd slurm-client munge
# The daemons start directly (no systemd), each with a pid file, and are
# stopped by those pids. Everything else lives in one directory: slurm.conf,
# the munge key and socket, controller state, logs (slurmctld.log, slurmd.log,
# munged.log, jobcomp.log) and pid files. Nothing under /etc/slurm is written,
# so a site's own Slurm configuration stays untouched; the Slurm commands find
# this cluster through SLURM_CONF (see `env`), and jobs inherit it.
#
# The cluster: one node named as this machine (CPUs, cores and memory from
# `slurmd -C`), reached over loopback only, one partition "local"; cores are
# the consumable resource, so a job asking for more tasks than there are cores
# is refused at sbatch; MPI through PMI2 (what MPICH from PyPI speaks); no
# accounting: finished jobs stay in `scontrol show job ID` for an hour and are
# appended to jobcomp.log.
#
# Environment:
#   PRELORA_SLURM_DIR    the cluster's directory (default /tmp/prelora-slurm)
#   PRELORA_SLURM_PORT   slurmctld's port; slurmd uses the next one
#                        (default 6917, beside Slurm's usual 6817/6818 so a
#                        site's daemons on the same machine do not collide)
#   PRELORA_SLURM_WAIT   seconds to wait for the node to become idle (60)
#
# Exit status: 0 done; 1 failed (the message names the log to read); 2 bad
# usage; 77 cannot run on this machine (not root, no apt, packages not
# installable): one line "cluster.sh: cannot run here: REASON" on stderr,
# which the test suite turns into a skip.
set -euo pipefail

CANNOT_RUN=77
DIR=${PRELORA_SLURM_DIR:-/tmp/prelora-slurm}
PORT=${PRELORA_SLURM_PORT:-6917}
WAIT=${PRELORA_SLURM_WAIT:-60}
CONF=$DIR/slurm.conf
MUNGE_DIR=$DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
PARTITION=local
PACKAGES=(slurmctld slurmd slurm-client munge)
# The daemons, in start order; each one's pid file is $DIR/run/NAME.pid.
DAEMONS=(munged slurmctld slurmd)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }
cannot_run() { echo "cluster.sh: cannot run here: $*" >&2; exit "$CANNOT_RUN"; }

# The Slurm commands find this cluster through SLURM_CONF, munge's clients
# (Slurm's auth plugin reads AuthInfo) through the socket named in the file.
export SLURM_CONF=$CONF

# --- Installation --------------------------------------------------------------
have_binaries() {
    local b
    for b in munged slurmctld slurmd sbatch srun scontrol scancel squeue sinfo; do
        PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    have_binaries && return 0
    command -v apt-get >/dev/null 2>&1 ||
        cannot_run "Slurm is not installed and there is no apt-get to install ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local log=$DIR/log/apt.log
    # Package lists are often absent on fresh images (and stale on old ones):
    # update only when apt knows no candidate, or when the install fails.
    local missing=0 p
    for p in "${PACKAGES[@]}"; do
        apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]' || missing=1
    done
    if [ "$missing" = 1 ]; then
        say "apt-get update (no candidate for ${PACKAGES[*]} yet)"
        apt-get update >"$log" 2>&1 ||
            cannot_run "apt-get update failed (no network?): $(tail -n 1 "$log")"
    fi
    say "apt-get install ${PACKAGES[*]}"
    # Wait for another apt (unattended upgrades) rather than fail on its lock.
    local -a install=(apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300)
    if ! "${install[@]}" "${PACKAGES[@]}" >>"$log" 2>&1; then
        if [ "$missing" = 0 ]; then
            apt-get update >>"$log" 2>&1 ||
                cannot_run "apt-get update failed (no network?): $(tail -n 1 "$log")"
        fi
        "${install[@]}" "${PACKAGES[@]}" >>"$log" 2>&1 ||
            cannot_run "apt-get install ${PACKAGES[*]} failed: $(tail -n 1 "$log")"
    fi
    have_binaries || cannot_run "${PACKAGES[*]} installed, but some Slurm or munge command is still missing"
}

# --- Processes -----------------------------------------------------------------
# The pid in NAME's pid file, if that process is alive and is NAME (a pid file
# left from before a reboot may name an unrelated process).
running_pid() {
    local name=$1 pidfile=$DIR/run/$1.pid pid comm
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    comm=$(cat "/proc/$pid/comm")
    # slurmd is installed as slurmd-wlm behind an alternatives link.
    [[ $comm == "$name"* ]] || return 1
    # A killed daemon stays a zombie where nothing reaps orphans (containers).
    alive "$pid" || return 1
    echo "$pid"
}

# Alive and not a zombie.
alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

stop_daemon() {
    local name=$1 pid i
    pid=$(running_pid "$name") || { rm -f "$DIR/run/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        alive "$pid" || break
        sleep 0.2
    done
    if alive "$pid"; then
        say "$name (pid $pid) did not stop in 20 s: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/run/$name.pid"
}

# The node as slurm.conf names it (slurmd -C's name: the short host name).
node_name() {
    local n=""
    [ ! -s "$CONF" ] || n=$(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF")
    echo "${n:-$(uname -n | cut -d. -f1)}"
}

# The node's state as sinfo reports it (idle, mixed, alloc, down*, ...).
node_state() {
    timeout 10 sinfo -h -n "$(node_name)" -o %T 2>/dev/null | head -n 1
}

is_up() {
    local d
    for d in "${DAEMONS[@]}"; do running_pid "$d" >/dev/null || return 1; done
    case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

# --- Configuration -------------------------------------------------------------
write_config() {
    local node hw
    # slurmd -C prints this machine's node line ("NodeName=... CPUs=...
    # RealMemory=..."); its second line is the uptime.
    hw=$(slurmd -C | head -n 1)
    [[ $hw =~ ^NodeName=([^ ]+)\ (.*)$ ]] || die "unexpected output of slurmd -C: $hw"
    node=${BASH_REMATCH[1]} hw=${BASH_REMATCH[2]}
    # Job ids must not repeat on this machine. MPICH names its shared memory
    # after the PMI job id ("JOBID.STEP"), and a job killed before
    # MPI_Finalize leaves that segment in /dev/shm: a later job with the same
    # id opens the stale segment and fails in MPI_Init ("Message truncated").
    # Real clusters never reuse ids so soon. The controller's state carries
    # the counter across restarts; the first id, chosen once per directory
    # from the clock, keeps a recreated directory from starting at 1 again.
    if [ ! -s "$DIR/first_job_id" ]; then
        echo $(( $(date +%s) % 50000000 + 1000 )) >"$DIR/first_job_id"
    fi
    cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a single-node cluster on $node over
# loopback. Regenerated at every start; edit the script, not this file.
ClusterName=prelora
FirstJobId=$(cat "$DIR/first_job_id")
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# MPICH from PyPI starts under srun through PMI2 (PMIx does not work with it).
MpiDefault=pmi2
SwitchType=switch/none
# No cgroups: the process tree is enough on one machine, and containers often
# lack a writable cgroup hierarchy.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Cores are what jobs consume, so two jobs share the machine only while
# their cores add up.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A request no node can satisfy is refused at sbatch instead of pending forever.
EnforcePartLimits=ALL
# No accounting (no slurmdbd): finished jobs stay readable with
# "scontrol show job ID" for MinJobAge seconds and are appended to the jobcomp log.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.log
MinJobAge=3600
# The node comes back by itself after a restart of slurmd.
ReturnToService=2
SlurmdTimeout=120
SlurmctldTimeout=120
InactiveLimit=0
KillWait=30
Waittime=0
SchedulerType=sched/backfill
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

prepare_munge() {
    getent passwd munge >/dev/null || die "the munge user is missing (the munge package creates it)"
    mkdir -p "$MUNGE_DIR"
    # munged refuses keys and directories that others can write or read.
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1 || [ -x /usr/sbin/mungekey ]; then
            PATH=$PATH:/usr/sbin mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chown -R munge:munge "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    chmod 0600 "$MUNGE_DIR/munge.key"
}

# --- Commands ------------------------------------------------------------------
start() {
    mkdir -p "$DIR/log" "$DIR/run"
    install_packages
    PATH=$PATH:/usr/sbin:/sbin
    if is_up; then
        say "already running (node $(node_name) $(node_state)); $(env_line)"
        return 0
    fi
    # Whatever is left of an earlier cluster (a daemon that died, pid files
    # from before a reboot, its jobs) goes: a fresh start each time. Only the
    # controller's state stays, for its job id counter (see write_config).
    stop_all
    rm -rf "$DIR/slurmd"
    mkdir -p "$DIR/ctld" "$DIR/slurmd"
    chmod 0755 "$DIR"
    write_config
    prepare_munge

    # munged as its own user, as the package would run it.
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    touch "$DIR/log/munged.log" "$DIR/run/munged.pid"
    chown munge:munge "$DIR/log/munged.log" "$DIR/run/munged.pid"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" 9>&- ||
        die "munged did not start: $(tail -n 3 "$DIR/log/munged.log" 2>/dev/null)"
    wait_for_pid munged "$DIR/log/munged.log"

    # Both daemons fork into the background and write their pid files. None
    # of the three may inherit the lock (fd 9): it would stay held.
    slurmctld -f "$CONF" 9>&- || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    wait_for_pid slurmctld "$DIR/log/slurmctld.log"
    # Jobs the controller recovered from its state (a cluster that was not
    # stopped cleanly) must not run now.
    cancel_jobs
    slurmd -f "$CONF" 9>&- || die "slurmd did not start; see $DIR/log/slurmd.log"
    wait_for_pid slurmd "$DIR/log/slurmd.log"

    local i state=""
    for ((i = 0; i < WAIT * 2; i++)); do
        state=$(node_state || true)
        case "$state" in
            idle) say "up: node $(node_name) idle, partition $PARTITION, config $CONF"
                  say "$(env_line)"
                  return 0 ;;
            down*|drain*|fail*)
                # A node that registered with a problem says why.
                if [ "$i" -ge 10 ]; then
                    die "node $(node_name) is $state: $(scontrol show node "$(node_name)" 2>/dev/null | grep -o 'Reason=.*' || true); see $DIR/log/slurmd.log"
                fi ;;
        esac
        for d in "${DAEMONS[@]}"; do
            running_pid "$d" >/dev/null || die "$d exited; see $DIR/log/$d.log: $(tail -n 2 "$DIR/log/$d.log" 2>/dev/null | tr '\n' ' ')"
        done
        sleep 0.5
    done
    die "node $(node_name) not idle after ${WAIT} s (state '${state:-unknown}'); see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
}

wait_for_pid() {
    local name=$1 log=$2 i
    for ((i = 0; i < 50; i++)); do
        running_pid "$name" >/dev/null && return 0
        sleep 0.2
    done
    die "$name did not write its pid file $DIR/run/$name.pid; see $log: $(tail -n 2 "$log" 2>/dev/null | tr '\n' ' ')"
}

cancel_jobs() {
    local ids i
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    [ -n "$ids" ] || return 0
    say "cancelling job(s) $(echo $ids)"
    # shellcheck disable=SC2086  # a list of job ids
    timeout 10 scancel $ids 2>/dev/null || true
    # Running jobs end once slurmd has killed their processes.
    running_pid slurmd >/dev/null || return 0
    for ((i = 0; i < 60; i++)); do
        [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null || true)" ] && break
        sleep 0.5
    done
}

stop_all() {
    local i
    # Jobs first, while the controller can still end them; their processes
    # would outlive slurmd otherwise.
    if running_pid slurmctld >/dev/null && [ -s "$CONF" ]; then
        cancel_jobs
    fi
    local d
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        stop_daemon "$d"
    done
}

stop() {
    [ -d "$DIR/run" ] || { say "not running"; return 0; }
    PATH=$PATH:/usr/sbin:/sbin
    local d any=0
    for d in "${DAEMONS[@]}"; do running_pid "$d" >/dev/null && any=1; done
    stop_all
    if [ "$any" = 1 ]; then say "stopped"; else say "not running"; fi
}

status() {
    PATH=$PATH:/usr/sbin:/sbin
    local d pid up=1
    for d in "${DAEMONS[@]}"; do
        if pid=$(running_pid "$d"); then say "$d running (pid $pid)"; else say "$d not running"; up=0; fi
    done
    if [ "$up" = 1 ] && is_up; then
        say "up: node $(node_name) $(node_state), config $CONF"
        return 0
    fi
    say "down"
    return 1
}

env_line() { echo "export SLURM_CONF=$CONF"; }

[ $# -eq 1 ] || { usage >&2; exit 2; }
case "$1" in
    start|stop) ;;
    status) status; exit ;;
    env) env_line; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    [ "$1" = stop ] && ! running_pid slurmctld >/dev/null && { say "not running"; exit 0; }
    cannot_run "needs root (slurmd runs jobs as their owner; apt installs the packages)"
fi

# One start or stop at a time (two test sessions, or a user beside the tests).
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock -w 120 9 || die "another cluster.sh holds $DIR/.lock"
"$1"
