#!/usr/bin/env bash
# Bring up a real Slurm cluster on one machine (munge + MariaDB + slurmdbd + slurmctld + three
# slurmd) without systemd, for tests, CI and laptops.  Run as root.  See slurm/README.md.
# Node <hostname> serves partitions gpu (default) and cpu; nodes n1 and n2, each in its own
# network and hostname namespace (a real link between them), serve the two-node partitions
# mn, mncancel and mnurgent (preemption: mnurgent preempts the other two).
#
#   sudo slurm/up.sh            # install if needed, start, wait until usable (idempotent)
#   sudo slurm/up.sh --fresh    # restart even when a healthy cluster is running (wipes jobs)
#
# Environment: CNNCAM_SLURM_BASE (default /var/tmp/cnncam-slurm) holds state, spool, logs,
# PIDs and the fake GPU devices; CNNCAM_SLURM_CPUS (default 8) and CNNCAM_SLURM_GPUS (default 2)
# are what the node advertises; CNNCAM_SLURM_TIMEOUT (default 60) bounds every wait in seconds;
# CNNCAM_SLURM_NETNS=auto|no (default auto): no = n1, n2 share the host's network and name.
set -euo pipefail

BASE=${CNNCAM_SLURM_BASE:-/var/tmp/cnncam-slurm}
CPUS=${CNNCAM_SLURM_CPUS:-8}
GPUS=${CNNCAM_SLURM_GPUS:-2}
WAIT_S=${CNNCAM_SLURM_TIMEOUT:-60}
NETNS=${CNNCAM_SLURM_NETNS:-auto}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRESH=0
MARK="# Written by cnncam slurm/up.sh"

for arg in "$@"; do
    case $arg in
        --fresh) FRESH=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "up.sh: unknown option $arg (valid: --fresh, --help)" >&2; exit 2 ;;
    esac
done

T0=$(date +%s.%N)
LAST=$T0
say() { printf '[up.sh] %s\n' "$*"; }
die() { printf '[up.sh] ERROR: %s\n' "$*" >&2; exit 1; }
phase() {  # print how long the phase that just ended took
    local now; now=$(date +%s.%N)
    awk -v a="$now" -v b="$LAST" -v n="$1" 'BEGIN { printf "[up.sh] %-28s %6.2f s\n", n, a - b }'
    LAST=$now
}

[[ $EUID -eq 0 ]] || die "run as root (it installs packages, writes /etc/slurm and starts daemons)"
[[ $CPUS =~ ^[1-9][0-9]*$ && $GPUS =~ ^[0-9]+$ ]] || die "CNNCAM_SLURM_CPUS/GPUS must be integers"
[[ $NETNS == auto || $NETNS == no ]] || die "CNNCAM_SLURM_NETNS must be auto or no, got '$NETNS'"

mkdir -p "$BASE"
chmod 755 "$BASE"
# One bring-up or tear-down at a time (CI and a developer may race).
exec 9>"$BASE/.lock"
flock -w "$WAIT_S" 9 || die "another up.sh/down.sh holds $BASE/.lock"

# Is PID alive and not a zombie?  Killed daemons can linger as zombies when PID 1 does not
# reap them, and `kill -0` still succeeds on those. See slurm/README.md.
alive() {
    local pid=$1 state
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(awk '{ sub(/^.*\) /, ""); print substr($0, 1, 1) }' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}
pid_of() { [[ -s $BASE/pids/$1.pid ]] && cat "$BASE/pids/$1.pid"; }
wait_for() {  # wait_for DESCRIPTION LOGFILE COMMAND... : poll until COMMAND succeeds
    local what=$1 logf=$2; shift 2
    local deadline=$((SECONDS + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            [[ -f $logf ]] && { echo "--- last lines of $logf"; tail -n 20 "$logf"; } >&2
            die "timed out after ${WAIT_S}s waiting for $what"
        fi
        sleep 0.1
    done
}

# ----------------------------------------------------------------------------------------------
# 1. Packages (Debian 12).  apt must not start the services: we start them ourselves below.
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get; install them by hand"
    say "installing ${missing[*]}"
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # Without it the postinst scripts try to start munge/mariadb/slurm via invoke-rc.d.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    trap '((made_policy)) && rm -f /usr/sbin/policy-rc.d' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    phase "apt-get update"
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$BASE/apt.log" 2>&1 \
        || { tail -n 30 "$BASE/apt.log" >&2; die "apt-get install failed (full log: $BASE/apt.log)"; }
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    trap - EXIT
    phase "apt-get install"
fi

# ----------------------------------------------------------------------------------------------
# 2. Configuration.  Generated into $BASE/conf, compared with what runs, then installed.
NODE=$(hostname -s)
MEM_MB=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 }' /proc/meminfo)
GPU_LAST=$((GPUS - 1))
# Memory is a consumable (and so an enforced) resource only on the two-node partitions: a job
# there gets --mem (default: its share of the node per CPU), and OverMemoryKill ends it above that.
MN_MEM="SelectTypeParameters=CR_Core_Memory DefMemPerCPU=$((MEM_MB / CPUS))"
mkdir -p "$BASE"/{conf,state,spool,log,run,pids,dev}
gres_line=""
((GPUS > 0)) && gres_line=" Gres=gpu:$GPUS"

# The two extra nodes run in network namespaces when the kernel allows it (slurm/multinode.sh),
# else on the host's network; the controller is then reached over the namespaces' bridge.
# shellcheck source=multinode.sh
source "$HERE/multinode.sh"
mn_choose_mode  # sets MN_MODE (netns | shared), MN_WHY, CTLD_ADDR, MN_ADDR[1..2], MN_HOST[1..2]

cat >"$BASE/conf/slurm.conf" <<EOF
$MARK; regenerated on every start.
# Nodes n1, n2: $MN_MODE network ($MN_WHY)
ClusterName=cnncam
SlurmctldHost=$NODE($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job becomes eligible after cred_expire+1 s; the default 120 makes requeue tests
# wait two minutes (needs a daemon restart;
# `scontrol reconfigure` is not enough).
AuthInfo=cred_expire=5
StateSaveLocation=$BASE/state
# %n: one spool, PID file and log per node (several slurmd on one host: MULTIPLE_SLURMD).
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Schedule at once, and run the backfill pass every second so requeued jobs restart quickly.
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2,bf_interval=1
# Let the node advertise more CPUs than the machine has, so DDP and array tests fit.
SlurmdParameters=config_overrides
# Accounting: without it sacct fails and submitit's job.result() hangs on cancelled jobs.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
# A step using more memory than --mem is killed (OUT_OF_MEMORY): no cgroups here, so it is polled.
JobAcctGatherParams=OverMemoryKill
JobAcctGatherFrequency=task=2
JobCompType=jobcomp/none
# Preemption by partition priority: mnurgent (tier 10) preempts mn (requeued) and mncancel
# (cancelled).  gpu and cpu share one tier, so nothing on node $NODE is ever preempted.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MpiDefault=none
ReturnToService=2
KillWait=5
GresTypes=gpu
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB${gres_line} State=UNKNOWN
PartitionName=gpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=$NODE MaxTime=INFINITE State=UP
NodeName=n1 NodeHostname=${MN_HOST[1]} NodeAddr=${MN_ADDR[1]} Port=${MN_PORT[1]} CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
NodeName=n2 NodeHostname=${MN_HOST[2]} NodeAddr=${MN_ADDR[2]} Port=${MN_PORT[2]} CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=mn Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=1 $MN_MEM
PartitionName=mncancel Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL $MN_MEM
PartitionName=mnurgent Nodes=n[1-2] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF $MN_MEM
EOF

{
    echo "$MARK; regenerated on every start."
    echo "AutoDetect=off"
    # Count-only gres drains the node; regular files leave CUDA_VISIBLE_DEVICES empty.
    # /dev/null-like char devices work: Slurm sets CUDA_VISIBLE_DEVICES from them.
    ((GPUS > 0)) && echo "NodeName=$NODE Name=gpu File=$BASE/dev/nvidia[0-$GPU_LAST]"
} >"$BASE/conf/gres.conf"

cat >"$BASE/conf/slurmdbd.conf" <<EOF
$MARK; regenerated on every start.
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF

conf_sum=$(cat "$BASE"/conf/{slurm,gres,slurmdbd}.conf | sha256sum | cut -d' ' -f1)

NODES=("$NODE" n1 n2)
nodes_up() {  # every node answers: idle, mixed or allocated (a trailing * means not responding)
    local states n
    states=$(timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    for n in "${NODES[@]}"; do
        grep -Eq "^$n (idle|mix|alloc)$" <<<"$states" || return 1
    done
}
healthy() {
    local n
    for n in munged mariadbd slurmdbd slurmctld "${NODES[@]/#/slurmd-}"; do
        local pid; pid=$(pid_of "$n") || return 1
        alive "$pid" || return 1
    done
    [[ -f $BASE/conf.sha256 && $(cat "$BASE/conf.sha256") == "$conf_sum" ]] || return 1
    mn_net_ok || return 1
    nodes_up || return 1
    timeout 5 sacct -n -X -S now >/dev/null 2>&1
}

if ((!FRESH)) && healthy; then
    phase "health check"
    say "cluster already up (node $NODE); nothing to do.  Use --fresh to restart and wipe it."
    exit 0
fi

# Anything left from an earlier (partial) bring-up goes first, so ports and state are free.
flock -u 9
"$HERE/down.sh" --quiet
flock -w "$WAIT_S" 9 || die "another up.sh/down.sh holds $BASE/.lock"
phase "stop leftovers (down.sh)"
for port in 6817 6818 6819 "${MN_PORT[1]}" "${MN_PORT[2]}"; do
    if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
        die "port $port is in use by a Slurm not started by this script; stop it first (ss -ltnp)"
    fi
done

if [[ -f /etc/slurm/slurm.conf ]] && ! grep -q "^$MARK" /etc/slurm/slurm.conf; then
    for f in slurm gres slurmdbd; do
        [[ -f /etc/slurm/$f.conf ]] && cp -n "/etc/slurm/$f.conf" "/etc/slurm/$f.conf.cnncam-backup"
    done
    say "backed up the existing /etc/slurm/*.conf to *.conf.cnncam-backup"
fi
mkdir -p /etc/slurm
install -m 644 "$BASE/conf/slurm.conf" /etc/slurm/slurm.conf
install -m 644 "$BASE/conf/gres.conf" /etc/slurm/gres.conf
install -m 600 "$BASE/conf/slurmdbd.conf" /etc/slurm/slurmdbd.conf

for ((i = 0; i < GPUS; i++)); do
    [[ -c $BASE/dev/nvidia$i ]] || { rm -f "$BASE/dev/nvidia$i"; mknod -m 666 "$BASE/dev/nvidia$i" c 1 3; }
done
# Job ids restart at 1 once the controller state is gone, so the accounting DB is wiped with it
# (below), or sacct reports old jobs under the new ids.
rm -rf "$BASE/state" "$BASE/spool"
mkdir -p "$BASE/state" "$BASE/spool"
if ! getent hosts "$NODE" >/dev/null; then
    echo "127.0.0.1 $NODE" >>/etc/hosts
    say "added '127.0.0.1 $NODE' to /etc/hosts"
fi
phase "configuration"
mn_net_up
phase "network of n1, n2 ($MN_MODE)"

# ----------------------------------------------------------------------------------------------
# 3. Daemons.  Each one daemonizes itself; we record its PID under $BASE/pids.
# Daemons must not inherit the lock (fd 9) or the caller's stdout: a CI runner capturing
# up.sh's output would otherwise wait for EOF forever.
record() {  # record NAME PIDFILE: as soon as the daemon wrote it, so down.sh can always stop it
    wait_for "$1 to write $2" /dev/null test -s "$2"
    cat "$2" >"$BASE/pids/$1.pid"
}

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running (not started here, left alone)"
else
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid </dev/null >"$BASE/log/munged.start" 2>&1 9>&- \
        || die "munged did not start: $(tail -n 5 "$BASE/log/munged.start")"
    record munged /run/munge/munged.pid
    wait_for "munged" /var/log/munge/munged.log sh -c 'munge -n | unmunge' 
fi
phase "munged"

if [[ ! -d /var/lib/mysql/mysql ]]; then
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$BASE/log/mariadb-install.log" 2>&1 \
        || die "mariadb-install-db failed, see $BASE/log/mariadb-install.log"
fi
mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
# mariadbd runs as mysql and fails silently when it cannot create its log.
touch "$BASE/log/mariadb.log" && chown mysql:mysql "$BASE/log/mariadb.log"
rm -f /run/mysqld/mysqld.pid
setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mysqld.pid \
    --log-error="$BASE/log/mariadb.log" </dev/null >"$BASE/log/mariadb.start" 2>&1 9>&- &
record mariadbd /run/mysqld/mysqld.pid
wait_for "MariaDB" "$BASE/log/mariadb.log" mariadb-admin --protocol=socket ping
mariadb --protocol=socket -e 'DROP DATABASE IF EXISTS slurm_acct_db'
phase "mariadbd (+ wipe accounting)"

slurmdbd </dev/null >"$BASE/log/slurmdbd.start" 2>&1 9>&- || die "slurmdbd did not start: $(tail -n 5 "$BASE/log/slurmdbd.start")"
record slurmdbd "$BASE/run/slurmdbd.pid"
wait_for "slurmdbd on port 6819" "$BASE/log/slurmdbd.log" sh -c "ss -Hltn 'sport = :6819' | grep -q ."
phase "slurmdbd"

slurmctld </dev/null >"$BASE/log/slurmctld.start" 2>&1 9>&- || die "slurmctld did not start: $(tail -n 5 "$BASE/log/slurmctld.start")"
record slurmctld "$BASE/run/slurmctld.pid"
wait_for "slurmctld" "$BASE/log/slurmctld.log" sh -c "scontrol ping | grep -q UP"
phase "slurmctld"

slurmd -N "$NODE" </dev/null >"$BASE/log/slurmd.start" 2>&1 9>&- \
    || die "slurmd did not start: $(tail -n 5 "$BASE/log/slurmd.start")"
record "slurmd-$NODE" "$BASE/run/slurmd-$NODE.pid"
for i in 1 2; do
    mn_start_slurmd "$i" </dev/null >"$BASE/log/slurmd-n$i.start" 2>&1 9>&- \
        || die "slurmd of n$i did not start: $(tail -n 5 "$BASE/log/slurmd-n$i.start")"
    record "slurmd-n$i" "$BASE/run/slurmd-n$i.pid"
done
wait_for "nodes ${NODES[*]} idle" "$BASE/log/slurmctld.log" nodes_up
# slurmctld registers the cluster with slurmdbd by itself; sacct answers once that is done.
wait_for "sacct" "$BASE/log/slurmctld.log" sacct -n -X -S now
echo "$conf_sum" >"$BASE/conf.sha256"
phase "slurmd + sacct"

total=$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "%.2f", a - b }')
say "cluster up in ${total} s: node $NODE, ${CPUS} CPUs, ${GPUS} fake GPUs, partitions gpu (default), cpu"
say "nodes n1, n2 (${CPUS} CPUs each, no GPUs): partitions mn, mncancel, mnurgent; network: $MN_MODE ($MN_WHY)"
sinfo
