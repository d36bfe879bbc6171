#!/bin/bash
# A one-node Slurm cluster on this machine (node `localhost`, 127.0.0.1), to run launch/slurm.sbatch and a
# sweep's job array for real: tests/test_slurm.py starts it.
#
#   launch/slurm_local_cluster.sh [start]   # as root: installs slurm-wlm and munge if missing, starts them
#   launch/slurm_local_cluster.sh stop      # stops the daemons it started
#
# Debian's slurm-wlm: munged, slurmctld and slurmd, started as plain daemons (no systemd needed, so it works
# in a container). It writes /etc/slurm/slurm.conf, and refuses to replace one it did not write. The node
# has YANJAX_SLURM_CPUS CPUs (default 8, more than this machine may have: Slurm is told to believe the
# config), no GPUs, JobRequeue=1; a requeued job starts again after ~6 s (cred_expire=5 and a 2 s scheduling
# loop; Slurm's defaults make it 2-3 minutes), and finished jobs stay in `scontrol show job` for 30 minutes.
# No accounting database (no sacct).
# Idempotent: run again, it keeps a running cluster and starts what is not running.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by yanjax launch/slurm_local_cluster.sh"
STATE=/var/lib/yanjax-slurm  # slurmctld state, slurmd spool, daemon logs
CPUS=${YANJAX_SLURM_CPUS:-8}

die() { echo "slurm_local_cluster.sh: $*" >&2; exit 1; }

stop() {
  local name pid i
  for name in slurmd slurmctld; do
    pid=$(cat "${STATE}/${name}.pid" 2>/dev/null || true)
    if [[ -n "${pid}" ]] && kill "${pid}" 2>/dev/null; then
      for i in $(seq 50); do  # gone before a new one binds its port
        kill -0 "${pid}" 2>/dev/null || break
        sleep 0.2
      done
      echo "stopped ${name}"
    fi
    rm -f "${STATE}/${name}.pid"
    if running "${name}"; then
      die "a ${name} this script did not start is running ($(pgrep -x "${name}" | tr '\n' ' ')): stop it first"
    fi
  done
  # munged is left running: other software on the machine may use it.
}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [[ $(id -u) -eq 0 ]] || die "slurm-wlm is not installed, and installing it needs root (apt-get install slurm-wlm)"
  command -v apt-get >/dev/null || die "slurm-wlm is not installed and there is no apt-get to install it"
  echo "installing slurm-wlm and munge (apt-get)"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null || die "apt-get install failed"
}

write_conf() {
  if [[ -f "${CONF}" ]] && ! grep -qF "${MARK}" "${CONF}"; then
    die "${CONF} exists and was not written by this script: not replacing it"
  fi
  mkdir -p "${STATE}/ctld" "${STATE}/d" /etc/slurm
  local tmp="${CONF}.tmp.$$"
  cat >"${tmp}" <<EOF
${MARK}
ClusterName=yanjax-local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/d
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=1800
KillWait=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "${tmp}" "${CONF}"; then
    rm -f "${tmp}"
    return 1  # unchanged
  fi
  mv "${tmp}" "${CONF}"
}

running() {  # a daemon of this name runs (any slurmctld here reads ${CONF}, which is ours)
  pgrep -x "$1" >/dev/null
}

start_daemon() {  # NAME ARGS...: starts it unless it runs; fails if it is not running a moment later
  local name=$1 i
  running "${name}" && return
  "$@" 9>&- || die "${name} did not start; see ${STATE}/${name}.log"  # not holding our lock
  for i in $(seq 10); do
    sleep 0.3
    running "${name}" && return
  done
  die "${name} exited after starting; see ${STATE}/${name}.log"
}

start() {
  install
  [[ $(id -u) -eq 0 ]] || die "starting the cluster needs root (it writes ${CONF} and runs the daemons as root)"
  local changed=0
  write_conf && changed=1
  if [[ ${changed} -eq 1 ]]; then
    echo "wrote ${CONF}"
    stop >/dev/null  # daemons read their config at start
  fi
  if ! pgrep -x munged >/dev/null; then
    if [[ ! -s /etc/munge/munge.key ]]; then  # the package makes one; an image may have dropped it
      mungekey --create && chown munge:munge /etc/munge/munge.key || die "could not create the munge key"
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged 9>&- || die "munged did not start"  # 9>&-: the daemon must not hold our lock
  fi
  start_daemon slurmctld
  start_daemon slurmd -N localhost
  local i state
  for i in $(seq 60); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case "${state}" in
      idle*|mixed*|allocated*|completing*) echo "slurm cluster up: node localhost ${state}, ${CPUS} CPUs"; return ;;
      down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node localhost not ready after 60 s (state '${state}'); see ${STATE}/slurmctld.log and slurmd.log"
}

if [[ $(id -u) -eq 0 ]]; then  # one start or stop at a time (parallel test workers)
  mkdir -p "${STATE}"
  exec 9>"${STATE}/lock"
  flock 9
fi
case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
