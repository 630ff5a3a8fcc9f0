#!/usr/bin/env bash
# Emulated hosts on this machine: network namespaces joined by a switch, real TCP between them.
#
#   scripts/netns-cluster.sh up N [SLOTS]    N hosts cfnode1..N (namespaces cf-h1..N, 10.213.0.11..),
#                                            each a veth to a bridge in namespace cf-sw; SLOTS ranks
#                                            per host in the hostfile (default 1)
#   scripts/netns-cluster.sh shape RATE DELAY [HOST...]
#                                            every host's link (or the named ones, by number) at RATE
#                                            (tc units: 10gbit, 200mbit; "none" = unshaped) in both
#                                            directions and DELAY one-way (us: 50us, 200us; "0")
#   scripts/netns-cluster.sh run MPIRUN-ARGS...
#                                            mpirun from host 1 over the hosts' TCP links, e.g.
#                                            run -n 3 --map-by node python -m collafuse_mpi.run
#   scripts/netns-cluster.sh exec HOST CMD...   a command on one host (its namespace and hostname)
#   scripts/netns-cluster.sh status
#   scripts/netns-cluster.sh down            removes every namespace, link, rule, helper, file and
#                                            the route that up made; exit 1 if anything is left
#
# Root only. Safety: before making anything, `up` adds `unreachable SUBNET.0/24` to the root
# namespace's routes (unless the machine already has that route), so no packet for the private
# subnet can leave the machine; the subnet exists only inside the namespaces made here.
# Rate: tbf on both ends of each host's veth (host egress and switch port egress), so a host
# sends and receives at RATE at most, as on a full-duplex switch port. Delay: this kernel may have
# no netem, so an iptables NFQUEUE rule on each host's egress hands packets to
# scripts/netns_delay.py, which releases each one DELAY after it was queued (packets pass
# undelayed if the helper is gone: --queue-bypass). The helpers run at real-time priority
# (SCHED_FIFO, CF_NETNS_DELAY_RT=50; 0 = normal), so ranks computing on the same cores do not
# hold packets back the way they never hold back a NIC; a helper sleeps in select between packets.
# Launch: Open MPI's PRRTE starts the remote daemons through its ssh agent; here the agent is a
# script that runs the daemon in the named host's namespace with that host's hostname (a UTS
# namespace each: ranks that share a hostname across namespaces hang at finalize). The TCP BTL and
# PRRTE's out-of-band channel are restricted to the subnet, and mpi_event_tick_rate=1 makes TCP
# progress prompt (with 100-200 us of delay small messages otherwise sometimes took 5 ms).
#
# Knobs: CF_NETNS_SUBNET=10.213.0 (the /24's first three octets), CF_NETNS_PREFIX=cf (namespace
# names), CF_NETNS_PYTHON (interpreter for the delay helper: python3), CF_NETNS_TCP_RETRIES=4
# (net.ipv4.tcp_retries2 in every host).
set -euo pipefail

SUBNET=${CF_NETNS_SUBNET:-10.213.0}
PREFIX=${CF_NETNS_PREFIX:-cf}
PY=${CF_NETNS_PYTHON:-python3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=/run/collafuse-netns-$PREFIX
SW=$PREFIX-sw
CIDR=$SUBNET.0/24
ROUTE_MARK=/run/collafuse-netns-route-$SUBNET

log() { printf '[netns-cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
[[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "CF_NETNS_SUBNET must be three octets, e.g. 10.213.0"

ns() { echo "$PREFIX-h$1"; }
host() { echo "${PREFIX}node$1"; }
addr() { echo "$SUBNET.$((10 + $1))"; }
count() { cat "$STATE/n" 2>/dev/null || echo 0; }
hosts_up() { local n; n=$(count); [ "$n" -gt 0 ] || die "no cluster (run: $0 up N)"; seq 1 "$n"; }

# Run a command on host i: its namespace (ip netns exec also bind-mounts /etc/netns/NS/hosts over
# /etc/hosts) and its own hostname in a fresh UTS namespace.
on_host() {
    local i=$1; shift
    ip netns exec "$(ns "$i")" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$(host "$i")" "$@"
}

write_agent() {
    # PRRTE calls: AGENT [options] HOST COMMAND... (as it would ssh); the command is a shell line.
    cat >"$STATE/agent" <<EOF
#!/usr/bin/env bash
while [ \$# -gt 0 ] && [ "\${1#-}" != "\$1" ]; do shift; done
target=\$1; shift
case \$target in
    ${PREFIX}node[0-9]*) i=\${target#${PREFIX}node} ;;
    $SUBNET.*) i=\$(( \${target##*.} - 10 )) ;;
    *) echo "netns agent: unknown host \$target" >&2; exit 255 ;;
esac
exec ip netns exec $PREFIX-h\$i unshare --uts sh -c 'hostname "\$0" && exec sh -c "\$1"' ${PREFIX}node\$i "\$*"
EOF
    chmod +x "$STATE/agent"
}

cmd_up() {
    local n=${1:-}; local slots=${2:-1}
    [[ $n =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "usage: $0 up N [SLOTS] (1 <= N <= 200)"
    [ -e "$STATE" ] && die "a cluster is up already ($STATE); run: $0 down"
    for c in ip tc unshare; do command -v $c >/dev/null || die "$c not found"; done
    ip netns add "$PREFIX-probe" 2>/dev/null || die "cannot create network namespaces here"
    ip netns del "$PREFIX-probe"
    mkdir -p "$STATE"
    echo "$n" >"$STATE/n"
    trap 'log "up failed at line $LINENO: $BASH_COMMAND; removing what it made"; trap - ERR; cmd_down; exit 1' ERR
    if [ -z "$(ip route show table main exact "$CIDR" type unreachable)" ]; then  # first of all: nothing leaves
        ip route add unreachable "$CIDR"
        touch "$ROUTE_MARK"  # made here: the last cluster on this subnet to go down removes it
    fi
    ip netns add "$SW"
    ip -n "$SW" link set lo up
    ip -n "$SW" link add br0 type bridge
    ip -n "$SW" link set br0 up
    : >"$STATE/hostfile"
    local hosts="127.0.0.1 localhost"$'\n'
    for i in $(seq 1 "$n"); do hosts+="$(addr "$i") $(host "$i")"$'\n'; done
    for i in $(seq 1 "$n"); do
        local h; h=$(ns "$i")
        ip netns add "$h"
        ip -n "$h" link set lo up
        # a peer that stops acknowledging is given up after ~6 s of retransmits, not ~15 min, so a
        # cut link ends the job (PRRTE drops a daemon it cannot reach); this namespace only.
        # CF_NETNS_TCP_RETRIES raises it for slow shaped links, whose queues can outlast 6 s
        ip netns exec "$h" sysctl -qw net.ipv4.tcp_retries2="${CF_NETNS_TCP_RETRIES:-4}"
        # both ends are created inside the namespaces: the root namespace never holds them
        ip link add "p$i" netns "$SW" type veth peer name eth0 netns "$h"
        ip -n "$SW" link set "p$i" master br0 up
        ip -n "$h" addr add "$(addr "$i")/24" dev eth0
        ip -n "$h" link set eth0 up
        [ -d /etc/netns ] || { mkdir /etc/netns; touch "$STATE/etc-netns"; }
        mkdir -p "/etc/netns/$h"
        printf '%s' "$hosts" >"/etc/netns/$h/hosts"
        echo "$(host "$i") slots=$slots" >>"$STATE/hostfile"
    done
    write_agent
    trap - ERR
    log "up: $n hosts $(host 1)..$(host "$n") on $CIDR (namespaces $(ns 1)..$(ns "$n"), switch $SW)"
}

unshape_host() {
    local i=$1 h; h=$(ns "$i")
    ip netns exec "$h" tc qdisc del dev eth0 root 2>/dev/null || true
    ip netns exec "$SW" tc qdisc del dev "p$i" root 2>/dev/null || true
    if [ -s "$STATE/delay-$i.pid" ]; then
        local pid; pid=$(cat "$STATE/delay-$i.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done  # its queue must be free
        rm -f "$STATE/delay-$i.pid"
    fi
    ip netns exec "$h" iptables -D OUTPUT -o eth0 -j NFQUEUE --queue-num 0 --queue-bypass 2>/dev/null || true
}

rate_bits() { # tc rate (10gbit, 200mbit, 1000kbit) -> bits/s
    local r=${1,,}
    case $r in
        *gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
        *mbit) echo $(( ${r%mbit} * 1000000 )) ;;
        *kbit) echo $(( ${r%kbit} * 1000 )) ;;
        *bit) echo "${r%bit}" ;;
        *) die "rate $1: use an integer with gbit, mbit or kbit" ;;
    esac
}

cmd_shape() {
    [ $# -ge 2 ] || die "usage: $0 shape RATE|none DELAY|0 [HOST...]"
    local rate=$1 delay=${2%us}; shift 2
    [[ $delay =~ ^[0-9]+$ ]] || die "delay $2: integer microseconds, e.g. 200us"
    local targets; targets=${*:-$(hosts_up)}
    local rt=()
    for i in $targets; do
        [ -e "/run/netns/$(ns "$i")" ] || die "no host $i"
        unshape_host "$i"
        if [ "$rate" != none ]; then
            local bits burst; bits=$(rate_bits "$rate")
            burst=$(( bits / 8 / 20000 ))  # 50 us at the rate, at least 10 frames
            [ "$burst" -ge 15140 ] || burst=15140
            for end in "$(ns "$i") eth0" "$SW p$i"; do
                set -- $end
                ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$bits" burst "$burst" latency 200ms
            done
        fi
        if [ "$delay" -gt 0 ]; then
            command -v iptables >/dev/null || die "delay needs iptables (apt-get install iptables)"
            ip netns exec "$(ns "$i")" iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 0 --queue-bypass
            rt=()
            if [ "${CF_NETNS_DELAY_RT:-50}" != 0 ] && chrt -f "${CF_NETNS_DELAY_RT:-50}" true 2>/dev/null; then
                rt=(chrt -f "${CF_NETNS_DELAY_RT:-50}")
            fi
            ip netns exec "$(ns "$i")" "${rt[@]}" "$PY" "$HERE/netns_delay.py" --queue 0 --delay-us "$delay" \
                </dev/null >"$STATE/delay-$i.log" 2>&1 &
            echo $! >"$STATE/delay-$i.pid"
        fi
    done
    sleep 0.3
    for i in $targets; do
        if [ -s "$STATE/delay-$i.pid" ] && ! kill -0 "$(cat "$STATE/delay-$i.pid")" 2>/dev/null; then
            cat "$STATE/delay-$i.log" >&2; die "the delay helper of host $i did not start"
        fi
    done
    log "shape: hosts $(echo $targets) at rate $rate, one-way delay ${delay} us${rt[*]:+ (delay helpers: ${rt[*]})}"
}

cmd_run() {
    hosts_up >/dev/null
    local mpirun; mpirun=$(command -v mpirun) || die "no mpirun on PATH"
    local env=(PRTE_MCA_plm_ssh_agent="$STATE/agent" PRTE_MCA_plm_ssh_no_tree_spawn=1
               PRTE_MCA_oob_tcp_if_include="$CIDR" OMPI_MCA_btl_tcp_if_include="$CIDR"
               OMPI_MCA_mpi_event_tick_rate=1 OMPI_MCA_btl="${CF_NETNS_BTL:-tcp,sm,self}"
               OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    on_host 1 env "${env[@]}" "$mpirun" --hostfile "$STATE/hostfile" "$@"
}

cmd_exec() {
    local i=${1:-}; shift || true
    [ -e "/run/netns/$(ns "$i")" ] || die "no host $i"
    on_host "$i" "$@"
}

leftovers() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(h[0-9]+|sw|probe)$" || true
    ls -d /etc/netns/"$PREFIX"-h* 2>/dev/null || true
    [ -e "$STATE" ] && echo "$STATE"
    if [ -e "$ROUTE_MARK" ] && ! ls -d /run/collafuse-netns-*/ >/dev/null 2>&1; then echo "route $CIDR"; fi
    return 0
}

cmd_down() {
    for f in "$STATE"/delay-*.pid; do
        [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    for h in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$PREFIX-(h[0-9]+|sw|probe)$" || true); do
        local pids; pids=$(ip netns pids "$h" 2>/dev/null || true)  # what runs there was started here
        [ -n "$pids" ] && kill $pids 2>/dev/null || true
        sleep 0.2
        pids=$(ip netns pids "$h" 2>/dev/null || true)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
        ip netns del "$h"  # takes its veth end, qdiscs and iptables rules with it
    done
    rm -rf /etc/netns/"$PREFIX"-h*
    [ -e "$STATE/etc-netns" ] && rmdir /etc/netns 2>/dev/null || true
    rm -rf "$STATE"
    if [ -e "$ROUTE_MARK" ] && ! ls -d /run/collafuse-netns-*/ >/dev/null 2>&1; then  # no other cluster
        ip route del unreachable "$CIDR" 2>/dev/null || true
        rm -f "$ROUTE_MARK"
    fi
    local left; left=$(leftovers)
    [ -z "$left" ] || die "left behind: $left"
    log "down: nothing left"
}

cmd_status() {
    local n; n=$(count)
    echo "hosts: $n  subnet: $CIDR  state: $STATE"
    ip route show | grep "$CIDR" || echo "(no route for $CIDR in the root namespace)"
    for i in $(seq 1 "$n"); do
        echo "$(host "$i") $(addr "$i") ns $(ns "$i"): $(ip netns exec "$(ns "$i")" tc qdisc show dev eth0 | head -1)" \
             "$( [ -s "$STATE/delay-$i.pid" ] && echo "delay helper pid $(cat "$STATE/delay-$i.pid")")"
    done
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    shape) shift; cmd_shape "$@" ;;
    run) shift; cmd_run "$@" ;;
    exec) shift; cmd_exec "$@" ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
