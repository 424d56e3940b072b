#!/usr/bin/env bash
# A real one-node Slurm cluster in a folder, for the job-template tests (tests/test_slurm_cluster.py) and for
# trying the scripts in slurm/ without a site cluster.
#
#   scripts/slurm_cluster.sh start  DIR    munged + slurmctld + slurmd, configured and logging under DIR; waits
#                                          until the node is idle. Idempotent: a running cluster is left alone.
#   scripts/slurm_cluster.sh stop   DIR    cancels the cluster's jobs, then stops the three daemons
#   scripts/slurm_cluster.sh status DIR    exit 0 when the node answers and is usable
#   scripts/slurm_cluster.sh env    DIR    prints `export SLURM_CONF=...`: eval it before sbatch/squeue/sinfo
#
# Needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge; the PMIx plugin for
# `srun --mpi=pmix` comes with slurm-wlm-basic-plugins). No systemd, no cgroups: it runs in containers.
# Environment knobs: SLURM_CLUSTER_PORT (slurmctld port, slurmd uses the next one; default 16817, away from a
# system Slurm's 6817), SLURM_CLUSTER_TIMEOUT (seconds to wait for the node; default 60),
# SLURM_CLUSTER_CRED_EXPIRE (credential lifetime = delay before a requeued job may restart; default 10 s).
set -euo pipefail

die() { echo "slurm_cluster: error: $*" >&2; exit 1; }
say() { echo "slurm_cluster: $*"; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[[ $# -eq 2 ]] || usage
cmd=$1
DIR=$2
case "$cmd" in start | stop | status | env) ;; *) usage ;; esac
DIR=$(realpath -m "$DIR")
CONF=$DIR/etc/slurm.conf
export SLURM_CONF=$CONF
PORT=${SLURM_CLUSTER_PORT:-16817}
TIMEOUT=${SLURM_CLUSTER_TIMEOUT:-60}
NODE=$(hostname -s)
SBIN=/usr/sbin

alive() { # alive PIDFILE: the daemon recorded in PIDFILE is running
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

node_state() { # the node's state as sinfo prints it (idle, mix, alloc, down*, drain, ...), empty if no answer
    timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1 || true
}

registered_at() { # when the node's slurmd last registered (SlurmdStartTime), empty if unknown
    timeout 10 scontrol show node "$NODE" 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*' | cut -d= -f2 || true
}

usable() { # the controller answers and the node can run jobs
    case "$(node_state)" in idle | mix | alloc | comp) return 0 ;; *) return 1 ;; esac
}

check_prereqs() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd starts jobs as their users; munged and Slurm run as root here)"
    local missing=()
    [[ -x $SBIN/munged ]] || missing+=(munge)
    [[ -x $SBIN/slurmctld ]] || missing+=(slurmctld)
    [[ -x $SBIN/slurmd ]] || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    compgen -G "/usr/lib/*/slurm-wlm/mpi_pmix.so" >/dev/null || missing+=(slurm-wlm-basic-plugins)
    # Slurm's PMIx plugin (srun --mpi=pmix, what the job scripts use) dlopens the unversioned libpmix.so,
    # which only libpmix-dev ships (libopenmpi-dev pulls it in).
    compgen -G "/usr/lib/*/pmix2/lib/libpmix.so" >/dev/null || missing+=(libpmix-dev)
    [[ ${#missing[@]} -eq 0 ]] || die "missing packages: ${missing[*]} (Debian: apt-get install ${missing[*]})"
}

write_config() {
    mkdir -p "$DIR"/{etc,state,spool,log,run,tmp}
    chmod 755 "$DIR"
    local mem cpus
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cpus=$(nproc)
    # At least 2: the tests run 2-rank jobs (oversubscribing a 1-core machine is fine for them).
    (( cpus >= 2 )) || cpus=2
    cat >"$CONF" <<EOF
# One-node test cluster written by scripts/slurm_cluster.sh; everything lives under $DIR.
ClusterName=hvdtrain
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s): short here
# so that the preemption test's requeue restarts at once.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=${SLURM_CLUSTER_CRED_EXPIRE:-10}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
# Job scratch (and PMIx's per-job folders) here too: two clusters on one host then never share a path.
TmpFS=$DIR/tmp
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track job processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node line below rather than what slurmd detects (a container's topology is odd).
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60/30 s): a requeued job then restarts as soon as it may.
SchedulerParameters=sched_interval=2,bf_interval=2
# A plain srun starts MPI ranks through PMIx too (the job scripts say --mpi=pmix anyway).
MpiDefault=pmix
# Jobs may be requeued (by themselves after a preemption checkpoint, by Slurm after a node failure).
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database for sacct).
MinJobAge=600
KillWait=10
InactiveLimit=0
MailProg=/bin/true
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    local m=$DIR/munge
    alive "$m/munged.pid" && return 0
    mkdir -p "$m"
    chmod 755 "$m" # users other than root reach the socket; the key itself stays 0600
    if [[ ! -s $m/munge.key ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$m/munge.key" >/dev/null
        else
            dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
        fi
    fi
    chmod 600 "$m/munge.key"
    # --force: munged refuses some folder permissions (e.g. DIR under a sticky /tmp) that are fine for a test.
    # 9>&-: the daemons must not inherit (and so hold forever) the start/stop lock below.
    $SBIN/munged 9>&- --force --key-file="$m/munge.key" --socket="$m/munge.socket" --pid-file="$m/munged.pid" \
        --log-file="$m/munged.log" --seed-file="$m/munged.seed" \
        || die "munged did not start; see $m/munged.log"
    for _ in $(seq 50); do [[ -S $m/munge.socket ]] && return 0; sleep 0.1; done
    die "munged started but its socket $m/munge.socket did not appear; see $m/munged.log"
}

start() {
    check_prereqs
    if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && usable; then
        say "already running in $DIR (node $NODE $(node_state))"
        return 0
    fi
    # Rewritten each start: a config from an older version of this script would otherwise linger.
    alive "$DIR/run/slurmctld.pid" || alive "$DIR/run/slurmd.pid" || write_config
    start_munge
    alive "$DIR/run/slurmctld.pid" || $SBIN/slurmctld -f "$CONF" 9>&- \
        || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    local since=0000
    if ! alive "$DIR/run/slurmd.pid"; then
        since=$(date +%Y-%m-%dT%H:%M:%S)
        $SBIN/slurmd -f "$CONF" -N "$NODE" 9>&- || die "slurmd did not start; see $DIR/log/slurmd.log"
    fi
    local state='' resumed=0
    for _ in $(seq $((TIMEOUT * 2))); do
        state=$(node_state)
        # A node state recovered from an earlier run reads idle before this slurmd has registered.
        [[ "$(registered_at)" > "$since" || "$(registered_at)" == "$since" ]] || state="${state:-?} (unregistered)"
        case "$state" in
        idle | mix | alloc | comp)
            say "running in $DIR: node $NODE $state; use it with: export SLURM_CONF=$CONF"
            return 0
            ;;
        down* | drain* | drng*)
            # A node left down by an earlier run (e.g. killed slurmd) comes back once resumed.
            if [[ $resumed -eq 0 ]]; then
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.5
    done
    echo "slurm_cluster: error: node $NODE not idle after ${TIMEOUT}s (state '${state:-no answer}')" >&2
    echo "--- $DIR/log/slurmctld.log (tail)" >&2
    tail -n 15 "$DIR/log/slurmctld.log" >&2 2>/dev/null || true
    echo "--- $DIR/log/slurmd.log (tail)" >&2
    tail -n 15 "$DIR/log/slurmd.log" >&2 2>/dev/null || true
    exit 1
}

stop_pid() { # stop_pid NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
    local pid
    alive "$2" || return 0
    pid=$(cat "$2")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { say "stopped $1"; return 0; }; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $1 (it ignored SIGTERM)"
}

stop() {
    if alive "$DIR/run/slurmctld.pid"; then
        # Jobs' processes belong to slurmstepd, which outlives slurmd: cancel them through Slurm first.
        local jobs
        jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do [[ -z $(timeout 10 squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
        fi
    fi
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    stop_pid munged "$DIR/munge/munged.pid"
}

# One start/stop at a time per folder: two at once would rewrite slurm.conf under each other's daemons.
if [[ $cmd == start || $cmd == stop ]] && command -v flock >/dev/null; then
    mkdir -p "$(dirname "$DIR")"
    exec 9>"$DIR.lock"
    flock -w 120 9 || die "another start/stop of $DIR holds $DIR.lock"
fi

case "$cmd" in
start) start ;;
stop) stop ;;
status)
    if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && usable; then
        say "running in $DIR: node $NODE $(node_state)"
    else
        say "not running in $DIR"
        exit 1
    fi
    ;;
env) echo "export SLURM_CONF=$CONF" ;;
esac
