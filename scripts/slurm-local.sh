#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian slurm-wlm 22.05 + munge) for the test suite.
#   sudo bash scripts/slurm-local.sh start    # install if missing, configure, start, wait for the node to be idle
#   bash scripts/slurm-local.sh status        # exit 0 when up (node idle/mixed/allocated)
#   sudo bash scripts/slurm-local.sh stop     # cancel jobs, stop daemons and leftover slurmstepd
# Callers must   export SLURM_CONF=${SLURM_LOCAL_DIR:-/tmp/trickbench-slurm}/slurm.conf   (start prints it).
# Partitions: debug (default), low (PriorityTier=1) and high (PriorityTier=10): a job in `high`
# requeues (PreemptMode=REQUEUE) jobs of `low` that stand in its way.
# Everything (config, munge socket, state, spool, logs, pids) lives in the state folder; the
# munge key is /etc/munge/munge.key (created if missing). Needs root (apt, munge user, slurmd).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/trickbench-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)
MUNGE_KEY=${MUNGE_KEY:-/etc/munge/munge.key}
MUNGE_SOCKET=$DIR/munge/munge.socket.2
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-6818}
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}
# also how long a requeued job waits before it may start again (SLURM default 120 s)
CRED_EXPIRE=${SLURM_LOCAL_CRED_EXPIRE:-10}
export SLURM_CONF=$CONF

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

alive() { # alive NAME: the pid recorded for NAME runs
    local f=$DIR/run/$1.pid pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

node_state() { # the node's state(s), lower case, flags (*~#!%$@^-+) stripped; empty if unreachable
    timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | tr -d '*~#!%$@^+-' | sort -u | tr '\n' ' ' | sed 's/ $//'
}

is_up() {
    alive munged && alive slurmctld && alive slurmd || return 1
    case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

install_packages() {
    local need=()
    command -v slurmctld >/dev/null || need+=(slurmctld)
    command -v slurmd >/dev/null || need+=(slurmd)
    command -v sbatch >/dev/null || need+=(slurm-client)
    command -v munged >/dev/null || need+=(munge)
    [ ${#need[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "packages missing (${need[*]}); run as root to install them"
    log "installing slurm-wlm munge (missing: ${need[*]})"
    local t0=$SECONDS made_policy=0
    # no daemon may be started by the packages' postinst: we run our own
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -y -qq -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold
        install --no-install-recommends slurm-wlm munge)
    local rc=0
    "${apt[@]}" >"$DIR/apt.log" 2>&1 || { apt-get -qq update >>"$DIR/apt.log" 2>&1 && "${apt[@]}" >>"$DIR/apt.log" 2>&1; } || rc=$?
    [ $made_policy -eq 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $rc -eq 0 ] || { tail -20 "$DIR/apt.log" >&2; die "apt-get install failed (log: $DIR/apt.log)"; }
    log "installed in $((SECONDS - t0)) s"
}

ensure_munge_key() {
    id munge >/dev/null 2>&1 || die "no munge user (is the munge package installed?)"
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating munge key $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
    chmod 0700 "$(dirname "$MUNGE_KEY")"
    chmod 0400 "$MUNGE_KEY"
}

write_conf() {
    local nodeline cpus
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    nodeline=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') || die "slurmd -C printed no NodeName line"
    nodeline=$(sed -E "s/^NodeName=[^ ]+/NodeName=$NODE/" <<<"$nodeline")
    cpus=$(grep -oE 'CPUs=[0-9]+' <<<"$nodeline" | cut -d= -f2)
    cat >"$CONF.new" <<EOF
# written by scripts/slurm-local.sh: single-node test cluster
ClusterName=trickbench
SlurmctldHost=$NODE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
PriorityType=priority/basic
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PreemptExemptTime=0
JobRequeue=1
ReturnToService=2
MessageTimeout=5
TCPTimeout=2
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmdTimeout=30
SlurmctldTimeout=30
Waittime=0
MaxArraySize=10001
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$nodeline State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=5 PreemptMode=OFF
PartitionName=low Nodes=$NODE MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 PreemptMode=REQUEUE
PartitionName=high Nodes=$NODE MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
EOF
    mv "$CONF.new" "$CONF"
    log "wrote $CONF ($cpus CPUs)"
}

start_munged() {
    alive munged && return 0
    mkdir -p "$DIR/munge"
    chown munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # munged daemonizes and writes its pid file; run as the munge user (owner of the key)
    setpriv --reuid=munge --regid=munge --init-groups \
        munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --num-threads=2 \
        || { tail -5 "$DIR/munge/munged.log" >&2 2>/dev/null || true; die "munged failed to start"; }
    local i
    for i in $(seq 50); do [ -s "$DIR/munge/munged.pid" ] && [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
    cp "$DIR/munge/munged.pid" "$DIR/run/munged.pid"
    alive munged || die "munged is not running (log: $DIR/munge/munged.log)"
    munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null || die "munge self-test failed"
}

start_daemon() { # start_daemon slurmctld|slurmd: daemonizes, writes its pid file under $DIR/run
    local name=$1 i
    alive "$name" && return 0
    rm -f "$DIR/run/$name.pid"
    # -c: start from a clean state (no jobs left over from an earlier run)
    "$name" -f "$CONF" -c >>"$DIR/log/$name.out" 2>&1 \
        || { tail -20 "$DIR/log/$name.log" "$DIR/log/$name.out" >&2 2>/dev/null || true; die "$name failed to start"; }
    for i in $(seq 100); do alive "$name" && return 0; sleep 0.1; done
    tail -20 "$DIR/log/$name.log" "$DIR/log/$name.out" >&2 2>/dev/null || true
    die "$name did not come up (log: $DIR/log/$name.log)"
}

cmd_start() {
    if is_up; then
        log "already running"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    [ "$(id -u)" -eq 0 ] || die "start needs root (slurmd, munge user, apt)"
    local t0=$SECONDS
    mkdir -p "$DIR"/{run,log,state,spool}
    chmod 0755 "$DIR"
    install_packages
    ensure_munge_key
    # a half-started cluster (one daemon died): restart everything from scratch
    if alive slurmctld || alive slurmd; then
        log "partially running: restarting"
        cmd_stop
        mkdir -p "$DIR"/{run,log,state,spool}
    fi
    write_conf
    start_munged
    start_daemon slurmctld
    start_daemon slurmd
    local i st=""
    for i in $(seq "$WAIT_S"); do
        st=$(node_state)
        case "$st" in
        idle | mixed | allocated) break ;;
        *down* | *drain* | *fail*)
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        alive slurmctld || die "slurmctld died (log: $DIR/log/slurmctld.log)"
        alive slurmd || die "slurmd died (log: $DIR/log/slurmd.log)"
        sleep 1
    done
    case "$st" in
    idle | mixed | allocated) ;;
    *)
        tail -20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
        die "node $NODE not idle after ${WAIT_S} s (state: '${st:-unreachable}')" ;;
    esac
    log "up in $((SECONDS - t0)) s: node $NODE $st, partitions: $(sinfo -h -o %P | tr '\n' ' ')"
    echo "export SLURM_CONF=$CONF"
}

descendants() { # all descendants of the given pids
    local p c
    for p in "$@"; do
        for c in $(pgrep -P "$p" 2>/dev/null || true); do
            echo "$c"
            descendants "$c"
        done
    done
}

kill_pids() { # TERM, then KILL after a few seconds
    [ $# -eq 0 ] && return 0
    kill -TERM "$@" 2>/dev/null || true
    local i p left
    for i in $(seq 50); do
        left=()
        for p in "$@"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
        [ ${#left[@]} -eq 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.2
}

cmd_stop() {
    local pids=() n p left
    # cancel jobs first so that slurmstepd ends its tasks
    if alive slurmctld; then
        timeout 10 scancel --full -u root >/dev/null 2>&1 || true
        timeout 10 scancel --full --state=PENDING >/dev/null 2>&1 || true
        for _ in $(seq 20); do
            [ -z "$(timeout 5 squeue -h -t running,completing -o %i 2>/dev/null)" ] && break
            sleep 0.25
        done
    fi
    for n in slurmd slurmctld munged; do
        if alive "$n"; then pids+=("$(cat "$DIR/run/$n.pid")"); fi
    done
    # slurmstepd left over (and whatever they still run)
    local steps
    steps=$(pgrep -x slurmstepd || true)
    # shellcheck disable=SC2086
    kill_pids ${steps} $(descendants ${steps}) "${pids[@]}"
    steps=$(pgrep -x slurmstepd || true)
    # shellcheck disable=SC2086
    [ -n "$steps" ] && kill -KILL $steps 2>/dev/null || true
    rm -f "$DIR"/run/*.pid "$DIR/munge/munged.pid" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    left=""
    for n in slurmctld slurmd slurmstepd; do left+=$(pgrep -a -x "$n" || true); done
    # munged: only ours (a system munged on the default socket may legitimately run)
    left+=$(pgrep -a -f "munged --socket=$MUNGE_SOCKET" || true)
    if [ -n "$left" ]; then
        log "warning: still running:"; echo "$left" >&2
        return 1
    fi
    log "stopped"
}

cmd_status() {
    local st
    if ! alive munged || ! alive slurmctld || ! alive slurmd; then
        echo "down (munged:$(alive munged && echo up || echo down) slurmctld:$(alive slurmctld && echo up || echo down) slurmd:$(alive slurmd && echo up || echo down))"
        return 1
    fi
    st=$(node_state)
    case "$st" in
    idle | mixed | allocated | completing) echo "up: node $NODE $st (SLURM_CONF=$CONF)"; return 0 ;;
    *) echo "unhealthy: node $NODE '${st:-unreachable}'"; return 1 ;;
    esac
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) echo "usage: $0 start|stop|status   (state folder: \$SLURM_LOCAL_DIR, default /tmp/trickbench-slurm)" >&2; exit 2 ;;
esac
