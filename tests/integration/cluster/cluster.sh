#!/usr/bin/env bash
# Several emulated nodes on this machine, for the tests and for trying a
# multi-node launch (jobs/polaris.pbs, scripts/launch.sh) before spending an
# allocation.
#
# Usage:
#   tests/integration/cluster/cluster.sh start [--nodes N] [--rate RATE]
#                                   create N nodes (default 2) joined by one
#                                   switch, each link capped at RATE (tc
#                                   syntax: 1gbit, 200mbit; default 1gbit);
#                                   a no-op when a cluster with the same N is
#                                   up (its links are then brought up and
#                                   the rate is changed in place)
#   tests/integration/cluster/cluster.sh stop   kill every process still inside a node,
#                                   delete the namespaces, links and host
#                                   files (a no-op when stopped)
#   tests/integration/cluster/cluster.sh status say whether it is up (exit 0) or not (1),
#                                   with nodes, addresses, link state and rate
#   tests/integration/cluster/cluster.sh hosts  print the node names, one per line
#   tests/integration/cluster/cluster.sh exec NODE [--] CMD [ARGS...]
#                                   run CMD on NODE: in its network namespace,
#                                   with its /etc/hosts and its host name
#   tests/integration/cluster/cluster.sh kill NODE
#                                   SIGKILL every process running on NODE
#                                   (what a node crash looks like to its peers)
#   tests/integration/cluster/cluster.sh link NODE up|down
#                                   take NODE's link down or bring it back
#   tests/integration/cluster/cluster.sh rate RATE
#                                   change every link's cap on a running cluster
#
# A node is a network namespace named after it (emu0, emu1, ...), with its
# own host name (each command enters a fresh UTS namespace, see nsexec), an
# address on a private subnet, and /etc/netns/NODE/hosts naming every node
# (`ip netns exec` binds it over /etc/hosts, so the names resolve the same on
# every node). Each node's eth0 is one end of a veth pair; the other end is a
# port of a bridge inside a separate "switch" namespace, so no address or
# route is added to this machine's own network and traffic stays between the
# nodes. A token bucket (tc tbf: this kernel has no netem) caps both
# directions of every link at RATE, like a NIC of that speed on a switch.
#
# Launching MPI across the nodes: MPICH's Hydra starts one proxy per host with
# "ssh HOST CMD"; tests/integration/cluster/nsexec stands in for ssh:
#   tests/integration/cluster/cluster.sh exec emu0 env HYDRA_LAUNCHER=ssh \
#       HYDRA_LAUNCHER_EXEC=$PWD/tests/integration/cluster/nsexec \
#       mpiexec -n 4 -ppn 2 -hosts emu0,emu1 hostname
# mpiexec itself must run on node 0 (inside its namespace): from this
# machine's own namespace the proxies could not connect back to it.
# The nodes share this machine's file systems (/dev/shm included) and process
# table; only the network and the host name are per node.
#
# Environment:
#   PRELORA_CLUSTER_DIR     state: node list, settings (default /tmp/prelora-cluster)
#   PRELORA_CLUSTER_PREFIX  node name prefix (default emu: emu0, emu1, ...)
#   PRELORA_CLUSTER_SUBNET  the first three octets of the nodes' /24
#                           (default 10.213.7; node i gets .(i+1))
#
# Exit status: 0 done; 1 failed; 2 bad usage; 77 cannot run on this machine
# (not root, no iproute2 and no apt to install it, network namespaces not
# permitted): one line "cluster.sh: cannot run here: REASON" on stderr, which
# the test suite turns into a skip.
set -euo pipefail

CANNOT_RUN=77
DIR=${PRELORA_CLUSTER_DIR:-/tmp/prelora-cluster}
PREFIX=${PRELORA_CLUSTER_PREFIX:-emu}
SUBNET=${PRELORA_CLUSTER_SUBNET:-10.213.7}
SWITCH=$PREFIX-sw
BRIDGE=br0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATH=$PATH:/usr/sbin:/sbin

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
say() { echo "cluster.sh: $*"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }
bad_usage() { echo "cluster.sh: $*" >&2; exit 2; }
cannot_run() { echo "cluster.sh: cannot run here: $*" >&2; exit "$CANNOT_RUN"; }

# --- Recorded state --------------------------------------------------------------
# $DIR/nodes: the node names this cluster created, one per line (stop deletes
# exactly these); $DIR/rate: the links' cap.
recorded_nodes() { [ -s "$DIR/nodes" ] && cat "$DIR/nodes" || true; }
recorded_rate() { [ -s "$DIR/rate" ] && cat "$DIR/rate" || echo unknown; }
has_netns() { [ -e "/run/netns/$1" ]; }
node_addr() { echo "$SUBNET.$(( $2 + 1 ))"; }
is_node() { recorded_nodes | grep -qx -- "$1"; }

is_up() {
    local n any=0
    has_netns "$SWITCH" || return 1
    while read -r n; do
        [ -n "$n" ] || continue
        has_netns "$n" || return 1
        any=1
    done < <(recorded_nodes)
    [ "$any" = 1 ]
}

# --- Requirements ----------------------------------------------------------------
require() {
    [ "$(id -u)" = 0 ] || cannot_run "needs root (network namespaces, veth links, tc)"
    if ! command -v ip >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || cannot_run "ip and tc (iproute2) are missing and there is no apt-get to install them"
        mkdir -p "$DIR"
        say "apt-get install iproute2"
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
              --no-install-recommends -o DPkg::Lock::Timeout=300 iproute2; } >"$DIR/apt.log" 2>&1 ||
            cannot_run "apt-get install iproute2 failed: $(tail -n 1 "$DIR/apt.log")"
    fi
    command -v unshare >/dev/null 2>&1 || cannot_run "unshare (util-linux) is missing"
    # Can we make a namespace at all (a container without CAP_SYS_ADMIN cannot)?
    local probe=$PREFIX-probe err
    if ! err=$(ip netns add "$probe" 2>&1); then
        cannot_run "ip netns add failed: $err"
    fi
    if ! err=$(ip netns exec "$probe" unshare --uts true 2>&1); then
        ip netns del "$probe" 2>/dev/null || true
        cannot_run "no UTS namespace inside a network namespace: $err"
    fi
    ip netns del "$probe"
}

# tc's token bucket: the burst must hold at least one segment the veth hands
# over (GSO makes them up to 64 KiB), and about 5 ms at the rate keeps the cap
# accurate over a collective of a few megabytes.
shape() {
    local ns=$1 dev=$2 rate=$3 bits burst
    bits=$(rate_bits "$rate") || die "cannot read the rate '$rate' (examples: 1gbit, 200mbit, 10gbit)"
    burst=$(( bits / 8 / 200 ))
    [ "$burst" -ge 131072 ] || burst=131072
    ip netns exec "$ns" tc qdisc replace dev "$dev" root tbf rate "$rate" burst "$burst" latency 100ms
}

rate_bits() {
    [[ $1 =~ ^([0-9]+)(|bit|kbit|mbit|gbit)$ ]] || return 1
    local v=${BASH_REMATCH[1]}
    case "${BASH_REMATCH[2]}" in
        ""|bit) echo "$v" ;;
        kbit) echo $(( v * 1000 )) ;;
        mbit) echo $(( v * 1000000 )) ;;
        gbit) echo $(( v * 1000000000 )) ;;
    esac
}

# --- Commands --------------------------------------------------------------------
start() {
    local nodes=2 rate=1gbit
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) nodes=${2:?--nodes needs a value}; shift ;;
            --nodes=*) nodes=${1#*=} ;;
            --rate) rate=${2:?--rate needs a value}; shift ;;
            --rate=*) rate=${1#*=} ;;
            *) bad_usage "start: unknown option $1" ;;
        esac
        shift
    done
    [[ $nodes =~ ^[0-9]+$ ]] && [ "$nodes" -ge 1 ] && [ "$nodes" -le 8 ] ||
        bad_usage "--nodes must be 1 to 8, got '$nodes'"
    rate_bits "$rate" >/dev/null || bad_usage "--rate must be a tc rate such as 1gbit or 200mbit, got '$rate'"
    require
    mkdir -p "$DIR"
    if is_up && [ "$(recorded_nodes | wc -l)" = "$nodes" ]; then
        # Links someone took down come back up: a start gives a whole cluster.
        local n
        while read -r n; do ip netns exec "$n" ip link set eth0 up; done < <(recorded_nodes)
        set_rate "$rate"
        say "already up: $(recorded_nodes | tr '\n' ' ')at $rate"
        return 0
    fi
    # Whatever is left of an earlier cluster goes first: a fresh start each time.
    stop_all
    local i n names=()
    for ((i = 0; i < nodes; i++)); do names+=("$PREFIX$i"); done
    for n in "$SWITCH" "${names[@]}"; do
        ! has_netns "$n" || die "a network namespace $n exists but is not this cluster's (see $DIR/nodes): delete it or set PRELORA_CLUSTER_PREFIX"
    done
    # Recorded before anything is made, so that stop finds a half-made cluster too.
    printf '%s\n' "${names[@]}" >"$DIR/nodes"
    echo "$rate" >"$DIR/rate"

    ip netns add "$SWITCH"
    ip netns exec "$SWITCH" ip link set lo up
    ip netns exec "$SWITCH" ip link add "$BRIDGE" type bridge
    ip netns exec "$SWITCH" ip link set "$BRIDGE" up
    local hosts="127.0.0.1 localhost"$'\n'
    for ((i = 0; i < nodes; i++)); do
        hosts+="$(node_addr "${names[i]}" "$i") ${names[i]}"$'\n'
    done
    for ((i = 0; i < nodes; i++)); do
        n=${names[i]}
        ip netns add "$n"
        ip netns exec "$n" ip link set lo up
        # The pair is made inside the node, then one end moves to the switch:
        # nothing appears in this machine's own namespace, even briefly.
        ip netns exec "$n" ip link add eth0 type veth peer name "port$i"
        ip netns exec "$n" ip link set "port$i" netns "$SWITCH"
        ip netns exec "$n" ip addr add "$(node_addr "$n" "$i")/24" dev eth0
        ip netns exec "$n" ip link set eth0 up
        ip netns exec "$SWITCH" ip link set "port$i" master "$BRIDGE"
        ip netns exec "$SWITCH" ip link set "port$i" up
        mkdir -p "/etc/netns/$n"
        printf '%s' "$hosts" >"/etc/netns/$n/hosts"
        # Resolve names from the hosts file only: no DNS server is reachable.
        printf 'hosts: files\n' >"/etc/netns/$n/nsswitch.conf"
    done
    set_rate "$rate"
    # Node 0 reaches every other node by name (where ping is installed).
    if command -v ping >/dev/null 2>&1; then
        for ((i = 1; i < nodes; i++)); do
            "$here/nsexec" --exec "${names[0]}" ping -c 1 -W 2 "${names[i]}" >/dev/null 2>&1 ||
                die "${names[0]} cannot reach ${names[i]} over the emulated link"
        done
    fi
    say "up: ${names[*]} on $SUBNET.0/24, links capped at $rate"
}

set_rate() {
    local rate=$1 i=0 n
    while read -r n; do
        [ -n "$n" ] || continue
        shape "$n" eth0 "$rate"
        shape "$SWITCH" "port$i" "$rate"
        i=$((i + 1))
    done < <(recorded_nodes)
    echo "$rate" >"$DIR/rate"
}

# SIGKILL every process inside NODE's network namespace; waits until they are gone.
kill_node() {
    local n=$1 pids i
    has_netns "$n" || return 0
    for ((i = 0; i < 50; i++)); do
        pids=$(ip netns pids "$n" 2>/dev/null || true)
        [ -n "$pids" ] || return 0
        # shellcheck disable=SC2086  # a list of pids
        kill -KILL $pids 2>/dev/null || true
        sleep 0.1
    done
    say "processes still on $n after SIGKILL: $(echo $pids)"
}

stop_all() {
    local n
    while read -r n; do
        [ -n "$n" ] || continue
        kill_node "$n"
        ! has_netns "$n" || ip netns del "$n"
        # Only the files this script wrote; the directory goes when empty.
        rm -f "/etc/netns/$n/hosts" "/etc/netns/$n/nsswitch.conf"
        rmdir "/etc/netns/$n" 2>/dev/null || true
    done < <(recorded_nodes)
    if [ -s "$DIR/nodes" ] || has_netns "$SWITCH"; then
        # Deleting the switch namespace deletes the bridge and the veth ends in
        # it (a veth pair goes when either end goes).
        kill_node "$SWITCH"
        ! has_netns "$SWITCH" || ip netns del "$SWITCH"
    fi
    rmdir /etc/netns 2>/dev/null || true
    rm -f "$DIR/nodes" "$DIR/rate"
}

stop() {
    if [ ! -s "$DIR/nodes" ] && ! has_netns "$SWITCH"; then
        say "not running"
        return 0
    fi
    stop_all
    say "stopped"
}

status() {
    if ! is_up; then
        say "down"
        return 1
    fi
    local n i=0 state
    say "up: $(recorded_nodes | wc -l) node(s), links capped at $(recorded_rate)"
    while read -r n; do
        state=$(ip netns exec "$n" cat /sys/class/net/eth0/operstate 2>/dev/null || echo missing)
        say "$n $(node_addr "$n" "$i") link=$state processes=$(ip netns pids "$n" 2>/dev/null | wc -l)"
        i=$((i + 1))
    done < <(recorded_nodes)
}

node_or_die() {
    is_up || die "the cluster is not up (tests/integration/cluster/cluster.sh start)"
    is_node "$1" || die "no node '$1' in this cluster ($(recorded_nodes | tr '\n' ' '))"
}

[ $# -ge 1 ] || { usage >&2; exit 2; }
cmd=$1; shift
case "$cmd" in
    -h|--help) usage; exit 0 ;;
    hosts) recorded_nodes; exit 0 ;;
    status) status; exit ;;
    exec)
        [ $# -ge 2 ] || bad_usage "usage: cluster.sh exec NODE [--] CMD [ARGS...]"
        node=$1; shift
        [ "$1" != -- ] || shift
        node_or_die "$node"
        exec "$here/nsexec" --exec "$node" "$@"
        ;;
    kill)
        [ $# -eq 1 ] || bad_usage "usage: cluster.sh kill NODE"
        node_or_die "$1"
        kill_node "$1"
        say "killed every process on $1"
        exit 0
        ;;
    link)
        [ $# -eq 2 ] && { [ "$2" = up ] || [ "$2" = down ]; } || bad_usage "usage: cluster.sh link NODE up|down"
        node_or_die "$1"
        ip netns exec "$1" ip link set eth0 "$2"
        say "$1 link $2"
        exit 0
        ;;
    start|stop|rate) ;;
    *) usage >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
    [ "$cmd" = stop ] && [ ! -s "$DIR/nodes" ] && { say "not running"; exit 0; }
    cannot_run "needs root (network namespaces, veth links, tc)"
fi

# One start or stop at a time.
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock -w 120 9 || die "another cluster.sh holds $DIR/.lock"
case "$cmd" in
    start) start "$@" ;;
    stop) stop ;;
    rate)
        [ $# -eq 1 ] || bad_usage "usage: cluster.sh rate RATE"
        rate_bits "$1" >/dev/null || bad_usage "RATE must be a tc rate such as 1gbit or 200mbit, got '$1'"
        is_up || die "the cluster is not up (tests/integration/cluster/cluster.sh start)"
        set_rate "$1"
        say "links capped at $1"
        ;;
esac
