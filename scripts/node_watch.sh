#!/usr/bin/env bash
# Stands between MPICH's Hydra and its remote shell (ssh) to say which node a
# multi-node job lost.
#
# Hydra starts one proxy per host with "LAUNCHER [OPTIONS] HOST COMMAND...";
# scripts/launch.sh points Hydra at this file (HYDRA_LAUNCHER_EXEC) and this
# file runs the real remote shell ($PRELORA_REMOTE_SHELL, default ssh) with
# the same arguments, as a child. When a node dies (or every process on it
# is killed, or its link goes down) Hydra only reports
# "control_cb ... assert (!closed) failed" and ends the job; this file sees
# its remote shell end abnormally (killed by a signal, or ssh's 255 for a
# lost connection) and prints one line naming the node and its ranks:
#   node_watch.sh: lost node emu1 (ranks 2-3): its MPI proxy ended (killed by signal 9)
# A proxy that ends normally, including after Hydra tore the job down because
# of some other failure, prints nothing.
#
# Environment (set by scripts/launch.sh):
#   PRELORA_REMOTE_SHELL   the real launcher (ssh, or a site's replacement)
#   PRELORA_JOB_HOSTS      the job's hosts in rank order, separated by spaces
#   PRELORA_JOB_PPN        ranks per host (ranks are placed host by host)

remote=${PRELORA_REMOTE_SHELL:-ssh}

# The host is the first word that is not an ssh option (as nsexec parses it).
host=""
args=("$@")
i=0
while [ "$i" -lt ${#args[@]} ]; do
    a=${args[i]}
    case "$a" in
        -[BbcDEeFIiJLlmOoPpQRSWw]) i=$((i + 2)); continue ;;
        --) host=${args[i + 1]:-}; break ;;
        -*) ;;
        *) host=$a; break ;;
    esac
    i=$((i + 1))
done
host=${host#*@}

# Hydra ends its launchers with a signal when it tears the job down: that is
# not a lost node.
stopped=""
trap 'stopped=1; kill -TERM "$child" 2>/dev/null' TERM HUP INT

# bash reports a child killed by a signal ("line N: PID Killed ...") on its
# own stderr, at any point after the child ends: the line below says it
# better. So bash's stderr goes before the child starts; the child keeps the
# real one.
exec 3>&2 2>/dev/null
"$remote" "$@" 2>&3 3>&- &
child=$!
while :; do
    rc=0
    wait "$child" || rc=$?
    kill -0 "$child" 2>/dev/null || break
done
exec 2>&3 3>&-
if [ -z "$stopped" ] && { [ "$rc" -gt 128 ] && [ "$rc" -lt 255 ] || [ "$rc" -eq 255 ]; }; then
    ranks=""
    if [[ ${PRELORA_JOB_PPN:-} =~ ^[0-9]+$ ]]; then
        n=0
        for h in ${PRELORA_JOB_HOSTS:-}; do
            if [ "$h" = "$host" ] || [ "${h%%.*}" = "${host%%.*}" ]; then
                first=$((n * PRELORA_JOB_PPN))
                last=$((first + PRELORA_JOB_PPN - 1))
                if [ "$first" = "$last" ]; then ranks=" (rank $first)"; else ranks=" (ranks $first-$last)"; fi
                break
            fi
            n=$((n + 1))
        done
    fi
    if [ "$rc" -eq 255 ]; then
        why="lost the connection to it ($remote exited 255)"
    else
        why="its MPI proxy ended (killed by signal $((rc - 128)))"
    fi
    echo "node_watch.sh: lost node ${host:-?}$ranks: $why" >&2
fi
exit "$rc"
