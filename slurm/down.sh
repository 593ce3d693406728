#!/usr/bin/env bash
# Tear down the cluster that slurm/up.sh started: cancel its jobs, then stop the slurmd of every
# node, slurmctld, slurmdbd, MariaDB and munge by the PIDs recorded under $CNNCAM_SLURM_BASE/pids,
# and remove the network namespaces, links and /etc/hosts lines of nodes n1, n2.
# Safe to run twice and on a machine where up.sh never ran.  Leaves packages, /etc/slurm and
# MariaDB's data in place (up.sh wipes the Slurm state and accounting DB on its next start).
#
#   sudo slurm/down.sh [--quiet]
set -euo pipefail

BASE=${CNNCAM_SLURM_BASE:-/var/tmp/cnncam-slurm}
QUIET=0
for arg in "$@"; do
    case $arg in
        --quiet) QUIET=1 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "down.sh: unknown option $arg (valid: --quiet, --help)" >&2; exit 2 ;;
    esac
done
say() { ((QUIET)) || printf '[down.sh] %s\n' "$*"; }

[[ -d $BASE/pids || -d $BASE/run ]] || { say "nothing to stop ($BASE has no PIDs)"; exit 0; }
[[ $EUID -eq 0 ]] || { echo "[down.sh] ERROR: run as root" >&2; exit 1; }
T0=$(date +%s.%N)
exec 9>"$BASE/.lock"
flock -w 60 9 || { echo "[down.sh] ERROR: another up.sh/down.sh holds $BASE/.lock" >&2; exit 1; }

# Alive and not a zombie: PID 1 here may never reap daemons we kill, and `kill -0` succeeds on
# zombies, so read the state letter from /proc/PID/stat instead. See slurm/README.md.
alive() {
    local state
    [[ -r /proc/$1/stat ]] || return 1
    state=$(awk '{ sub(/^.*\) /, ""); print substr($0, 1, 1) }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}
# Stop PID, but only if it still is the program we started (PIDs get reused).
stop_pid() {
    local name=$1 pid=$2 i
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" || return 0
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do alive "$pid" || { say "stopped $name ($pid)"; return 0; }; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    say "killed $name ($pid) after 15 s"
}
pids_of() {  # recorded PID, plus the daemon's own PidFile for slurm daemons (ours: under $BASE)
    local name=$1
    [[ -s $BASE/pids/$name.pid ]] && cat "$BASE/pids/$name.pid"
    [[ -s $BASE/run/$name.pid ]] && cat "$BASE/run/$name.pid"
    return 0
}

# Jobs first, while the controller can still cancel them, so no job process outlives the cluster.
if [[ -n $(pids_of slurmctld) ]] && timeout 5 scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(timeout 5 squeue -h -o %A 2>/dev/null | sort -u || true)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086  # one argument per job id
        timeout 10 scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.1
        done
        say "cancelled jobs: $(echo $jobs)"
    fi
fi

# slurmd-<node>: one per node (up.sh runs three); plain "slurmd" is what older up.sh versions recorded.
slurmds=$(cd "$BASE" && for f in {pids,run}/slurmd.pid {pids,run}/slurmd-*.pid; do if [[ -e $f ]]; then basename "$f" .pid; fi; done | sort -u)
for name in $slurmds slurmctld slurmdbd mariadbd munged; do
    for pid in $(pids_of "$name" | sort -u); do stop_pid "${name%%-*}" "$pid"; done
    rm -f "$BASE/pids/$name.pid"
done
# Step daemons of jobs that were still ending when slurmd stopped.
for stat in /proc/[0-9]*/comm; do
    [[ $(cat "$stat" 2>/dev/null) == slurmstepd ]] || continue
    pid=${stat#/proc/}; pid=${pid%/comm}
    stop_pid slurmstepd "$pid"
done
# Namespaces, links and the /etc/hosts lines of nodes n1, n2 (slurm/multinode.sh).
# shellcheck source=multinode.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/multinode.sh"
mn_net_down
rm -f "$BASE/conf.sha256"
say "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "cluster down in %.2f s", a - b }')"
