# Nodes n1 and n2 of the local cluster: two more slurmd on this machine (Debian's Slurm is built
# with MULTIPLE_SLURMD), sourced by up.sh and down.sh.
#
# netns mode (the default where the kernel allows it): each node runs in its own network
# namespace (cnncam-n1, cnncam-n2) with one veth link into the bridge cnncambr0 (10.77.0.1/24,
# the controller's address for them), and in its own UTS namespace, so jobs on n2 see
# `hostname` = n2 and address 10.77.0.12.  Ranks of a two-node job then talk over a link, as on
# a real cluster: a MASTER_ADDR of 127.0.0.1 hangs instead of passing by accident.  Nothing is
# routed out of 10.77.0.0/24 (no NAT): jobs on n1/n2 cannot reach the internet.
# shared mode (fallback, or CNNCAM_SLURM_NETNS=no): both slurmd use the host's network and name.
#
# Node names must resolve (submitit and cnncam take MASTER_ADDR from SLURM_JOB_NODELIST), so
# tagged lines go into /etc/hosts; down.sh removes exactly those lines again.

MN_BRIDGE=cnncambr0
MN_NET=10.77.0
MN_TAG="# cnncam-slurm-mn"
MN_PORT=([1]=6828 [2]=6829)

mn_netns_works() {  # can this kernel (and container) give a process its own network namespace?
    local ok=0
    command -v ip >/dev/null && command -v nsenter >/dev/null && command -v unshare >/dev/null || return 1
    ip netns del cnncam-probe 2>/dev/null  # left by an interrupted probe
    ip netns add cnncam-probe 2>/dev/null || return 1
    if ip link add cnncam-probe0 type veth peer name cnncam-probe1 2>/dev/null; then
        ip link set cnncam-probe1 netns cnncam-probe 2>/dev/null \
            && ip link add cnncam-probebr type bridge 2>/dev/null \
            && nsenter --net=/run/netns/cnncam-probe unshare --uts --mount true 2>/dev/null \
            && ok=1
        ip link del cnncam-probebr 2>/dev/null
        ip link del cnncam-probe0 2>/dev/null
    fi
    ip netns del cnncam-probe 2>/dev/null
    ((ok))
}

mn_choose_mode() {
    local other
    MN_MODE=shared
    if [[ ${NETNS:-auto} == no ]]; then
        MN_WHY="CNNCAM_SLURM_NETNS=no"
    elif ! mn_netns_works; then
        MN_WHY="no network namespaces here (ip netns/veth/bridge/nsenter failed); jobs on n1 and n2 share the host's network and name"
    elif other=$(ip -o -4 addr show 2>/dev/null | awk -v b="$MN_BRIDGE" -v n="$MN_NET." '$2 != b && index($4, n) == 1 { print $2 }') \
        && [[ -n $other ]]; then
        MN_WHY="$MN_NET.0/24 is already used by interface $other; jobs on n1 and n2 share the host's network and name"
    else
        MN_MODE=netns
        MN_WHY="own network + hostname namespace per node, bridge $MN_BRIDGE $MN_NET.0/24"
    fi
    if [[ $MN_MODE == netns ]]; then
        CTLD_ADDR=$MN_NET.1
        MN_ADDR=([1]=$MN_NET.11 [2]=$MN_NET.12)
        MN_HOST=([1]=n1 [2]=n2)
    else
        CTLD_ADDR=127.0.0.1
        MN_ADDR=([1]=127.0.0.1 [2]=127.0.0.1)
        MN_HOST=([1]=$NODE [2]=$NODE)
    fi
    local i addr
    for i in 1 2; do  # a name resolving elsewhere (not through our tagged line) would misroute ranks
        addr=$(grep -v "$MN_TAG\$" /etc/hosts | awk -v n="n$i" '{ for (f = 2; f <= NF; f++) if ($f == n) { print $1; exit } }')
        [[ -z $addr ]] || die "host name n$i is already in /etc/hosts ($addr); remove that line first"
    done
}

mn_hosts_remove() {  # rewrite in place (not sed -i: /etc/hosts may be a bind mount)
    [[ -f /etc/hosts ]] && grep -q "$MN_TAG\$" /etc/hosts || return 0
    local kept
    kept=$(grep -v "$MN_TAG\$" /etc/hosts || true)
    printf '%s\n' "$kept" >/etc/hosts
}

mn_net_down() {
    local i
    for i in 1 2; do
        ip netns del "cnncam-n$i" 2>/dev/null || true
        ip link del "cnncamv$i" 2>/dev/null || true
    done
    ip link del "$MN_BRIDGE" 2>/dev/null || true
    mn_hosts_remove
}

mn_net_up() {
    local i
    mn_net_down
    if [[ $MN_MODE == netns ]]; then
        ip link add "$MN_BRIDGE" type bridge
        ip addr add "$MN_NET.1/24" dev "$MN_BRIDGE"
        ip link set "$MN_BRIDGE" up
        for i in 1 2; do
            ip netns add "cnncam-n$i"
            ip link add "cnncamv$i" type veth peer name "cnncamv${i}p"
            ip link set "cnncamv${i}p" netns "cnncam-n$i"
            ip -n "cnncam-n$i" link set "cnncamv${i}p" name eth0
            ip -n "cnncam-n$i" addr add "${MN_ADDR[$i]}/24" dev eth0
            ip -n "cnncam-n$i" link set lo up
            ip -n "cnncam-n$i" link set eth0 up
            ip link set "cnncamv$i" master "$MN_BRIDGE" up
        done
        # No DNS inside: lookups of unknown names fail at once instead of after 10 s each.
        printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$BASE/conf/resolv.netns"
        printf '%s n1 %s\n%s n2 %s\n' "${MN_ADDR[1]}" "$MN_TAG" "${MN_ADDR[2]}" "$MN_TAG" >>/etc/hosts
    else
        printf '127.0.0.1 n1 n2 %s\n' "$MN_TAG" >>/etc/hosts
    fi
}

mn_net_ok() {
    grep -q "$MN_TAG\$" /etc/hosts || return 1
    [[ $MN_MODE == netns ]] || return 0
    [[ -e /run/netns/cnncam-n1 && -e /run/netns/cnncam-n2 ]] && ip link show "$MN_BRIDGE" >/dev/null 2>&1
}

mn_start_slurmd() {  # mn_start_slurmd I: slurmd of node nI (it daemonizes itself)
    local i=$1
    if [[ $MN_MODE == netns ]]; then
        # nsenter --net, not `ip netns exec` (which remounts /sys and upsets slurmd's cgroup probe).
        nsenter --net="/run/netns/cnncam-n$i" unshare --uts --mount sh -c \
            "hostname n$i && mount --bind '$BASE/conf/resolv.netns' /etc/resolv.conf && exec slurmd -N n$i"
    else
        slurmd -N "n$i"
    fi
}
