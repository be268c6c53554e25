#!/usr/bin/env bash
# A one-node SLURM cluster on localhost for the suite tests (tests/test_suites_slurm.py):
# Debian's slurm-wlm and munge, no accounting storage (so no sacct: states come from
# squeue and submitit's files), ProctrackType=proctrack/linuxproc and TaskPlugin=task/none
# (no cgroups inside a container). Idempotent: a running cluster is left as it is.
# Needs root. `--install` also apt-get installs the packages (what .ci/run does).
set -euo pipefail
if [[ "${1:-}" == "--install" ]] && ! command -v slurmctld >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
fi
for tool in slurmctld slurmd munged sinfo; do
  command -v "$tool" >/dev/null 2>&1 || { echo "slurm-up: $tool is not installed" >&2; exit 3; }
done
if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  exit 0  # already up
fi
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))  # MB, half for jobs
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge \
  /var/lib/munge /var/log/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  mungekey --create --keyfile=/etc/munge/munge.key
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0400 /etc/munge/munge.key
chmod 0755 /run/munge
if ! pgrep -u munge -x munged >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
fi
cat > /etc/slurm/slurm.conf <<CONF
# written by featcache's .ci/slurm-up.sh: a one-node test cluster
ClusterName=featcache-ci
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
pgrep -x slurmctld >/dev/null 2>&1 || slurmctld
pgrep -x slurmd >/dev/null 2>&1 || slurmd
for _ in $(seq 1 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    exit 0
  fi
  sleep 1
done
echo "slurm-up: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 4
