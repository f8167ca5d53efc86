#!/usr/bin/env bash
# A one-machine Slurm cluster on localhost (Debian/Ubuntu's slurm-wlm and munge), for the cluster
# tests (tests/cluster/) and for trying `hydra/launcher=slurm` on a workstation:
#     sudo experiments/slurm/start_local_slurm.sh        # then: sinfo, sbatch, srun ...
# Idempotent: installs the packages if missing (apt-get, as root), writes /etc/slurm/slurm.conf
# (one node, this host, SLURM_CPUS CPUs, default 2; partition `debug`) unless a config not written
# by this script is there, starts munged, slurmctld and slurmd if they are not running, and waits
# until the node takes jobs. Exit code 0: the cluster is up; else the last line says why.
set -uo pipefail
CPUS="${SLURM_CPUS:-2}"
CONF=/etc/slurm/slurm.conf
MARK="# written by met_lightning experiments/slurm/start_local_slurm.sh"
fail() { echo "local Slurm not started: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (apt-get, /etc/slurm, daemons); run it with sudo"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || fail "slurmctld/munged missing and no apt-get to install them"
    echo "installing slurm-wlm and munge (apt-get)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
        >/tmp/met_slurm_apt.log 2>&1 || fail "apt-get install slurm-wlm munge failed (/tmp/met_slurm_apt.log)"
fi
HOST="$(hostname -s)"
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "using the existing $CONF (not written by this script)"
else
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
    cat > "$CONF.new" <<CONFEOF
$MARK
ClusterName=metlocal
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# a requeued job starts again after 5 s (default 120 s)
AuthInfo=cred_expire=5
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
MpiDefault=none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
    if ! cmp -s "$CONF.new" "$CONF"; then
        mv "$CONF.new" "$CONF"
        # daemons started with the old config (by this script: their pid files) restart with it
        for d in slurmd slurmctld; do
            [ -f "/run/$d.pid" ] && kill "$(cat "/run/$d.pid")" 2>/dev/null && sleep 1
        done
    else
        rm -f "$CONF.new"
    fi
fi

pgrep -x munged >/dev/null || {
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged || fail "munged did not start"
}
pgrep -x slurmctld >/dev/null || slurmctld || fail "slurmctld did not start (/var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || fail "slurmd did not start (/var/log/slurm/slurmd.log)"

for _ in $(seq 60); do
    state=$(sinfo -h -N -o %t -n "$HOST" 2>/dev/null | head -1)
    case "$state" in
        idle*|mix*|alloc*) echo "local Slurm up: node $HOST ($state), $CPUS CPUs, partition debug"; exit 0 ;;
        down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
    esac
    sleep 1
done
fail "node $HOST not ready after 60 s (state: ${state:-none}; /var/log/slurm/slurmd.log)"
