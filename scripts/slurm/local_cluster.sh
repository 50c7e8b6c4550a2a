#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for trying and testing scripts/slurm/kintsugi.sbatch.
#
#   scripts/slurm/local_cluster.sh start    # install slurm-wlm + munge if missing, write slurm.conf, start daemons
#   scripts/slurm/local_cluster.sh status   # daemons, sinfo, squeue
#   scripts/slurm/local_cluster.sh stop     # stop slurmd, slurmctld and munged
#
# Needs root and Debian/Ubuntu (apt). No systemd: the daemons are started directly. Every subcommand
# is idempotent. The node gets this machine's real CPU count and memory (`slurmd -C`); set
# KINTSUGI_SLURM_CPUS=N to advertise N CPUs instead (more tasks than cores, for pipelines deeper than
# the machine; `SlurmdParameters=config_overrides`). SLURM_CONF picks the config path (default
# /etc/slurm/slurm.conf); a config that this script did not write is never overwritten.
# State and logs: /var/spool/slurmctld, /var/spool/slurmd, /var/log/slurm. Daemons run as root.
set -euo pipefail

CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by kintsugi scripts/slurm/local_cluster.sh"
LOGDIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
RUNDIR=/run/slurm
PARTITION=${KINTSUGI_SLURM_PARTITION:-debug}

say() { echo "local_cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get; install them by hand"
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
      mungekey --create --force >/dev/null
    else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0400 /etc/munge/munge.key
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2.lock
  say "starting munged"
  if command -v runuser >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
  else
    su -s /bin/sh munge -c /usr/sbin/munged
  fi
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

write_conf() {
  local host cpus mem node
  host=$(hostname -s)
  # slurmd -C: the real hardware of this node, e.g. "NodeName=vm CPUs=2 ... RealMemory=24105"
  node=$(slurmd -C 2>/dev/null | head -1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  cpus=${KINTSUGI_SLURM_CPUS:-${cpus:-$(nproc)}}
  mem=${mem:-1024}
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it (set SLURM_CONF=/some/other/path)"
  fi
  mkdir -p "$(dirname "$CONF")"
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARK
# A single-node test cluster: node $host with $cpus CPUs and ${mem} MB.
ClusterName=kintsugi
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$RUNDIR/slurmctld.pid
SlurmdPidFile=$RUNDIR/slurmd.pid
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
    rm -f "$tmp"
  else
    mv "$tmp" "$CONF"
    chmod 0644 "$CONF"
    say "wrote $CONF (node $host, $cpus CPUs, ${mem} MB)"
  fi
}

start() {
  [[ $(id -u) == 0 ]] || die "run as root (the daemons and /etc/slurm need it)"
  install_packages
  start_munge
  write_conf
  export SLURM_CONF=$CONF
  mkdir -p "$LOGDIR" "$CTLD_SPOOL" "$SLURMD_SPOOL" "$RUNDIR"
  if ! pid_alive "$RUNDIR/slurmctld.pid"; then
    say "starting slurmctld"
    # -i: ignore state files that do not match this config (a previous cluster on this machine)
    /usr/sbin/slurmctld -i
  fi
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  scontrol ping 2>/dev/null | grep -q UP || die "slurmctld did not come up (see $LOGDIR/slurmctld.log)"
  if ! pid_alive "$RUNDIR/slurmd.pid"; then
    say "starting slurmd"
    /usr/sbin/slurmd
  fi
  local host state
  host=$(hostname -s)
  for _ in $(seq 150); do
    state=$(sinfo -h -n "$host" -o %t 2>/dev/null | head -1)
    case $state in
      idle|mix|alloc|comp) break ;;
      drain*|down*|drng) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
  done
  case $state in
    idle|mix|alloc|comp) say "cluster up: partition $PARTITION, node $host ($state)" ;;
    *) die "node $host is '$state', not idle (see $LOGDIR/slurmd.log and \`scontrol show node $host\`)" ;;
  esac
}

stop_daemon() {  # name pidfile
  local pid
  if pid_alive "$2"; then
    pid=$(cat "$2")
    say "stopping $1 ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

stop() {
  stop_daemon slurmd "$RUNDIR/slurmd.pid"
  stop_daemon slurmctld "$RUNDIR/slurmctld.pid"
  stop_daemon munged /run/munge/munged.pid
}

status() {
  local rc=0
  for d in "munged:/run/munge/munged.pid" "slurmctld:$RUNDIR/slurmctld.pid" "slurmd:$RUNDIR/slurmd.pid"; do
    if pid_alive "${d#*:}"; then echo "${d%%:*}: running ($(cat "${d#*:}"))"; else echo "${d%%:*}: stopped"; rc=1; fi
  done
  if [[ $rc == 0 ]]; then
    SLURM_CONF=$CONF sinfo || rc=1
    SLURM_CONF=$CONF squeue || rc=1
  fi
  return $rc
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
