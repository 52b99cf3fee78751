#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the launcher=slurm tests (docs/cluster.md).
#
#   bash scripts/slurm_local.sh start    # install (apt, if missing) and start; idempotent
#   bash scripts/slurm_local.sh status   # exit 0 when the node takes jobs
#   bash scripts/slurm_local.sh stop
#   eval "$(bash scripts/slurm_local.sh env)"   # SLURM_CONF for sbatch, squeue, scontrol
#
# Debian's slurmctld, slurmd and munge, started by hand (no systemd): munged for authentication,
# slurmctld and slurmd as root, one node "localhost" with every core of this machine (at least 2)
# and most of its memory. Process tracking by process tree (proctrack/linuxproc) and no task
# binding (task/none): no cgroups are needed. The configuration and the daemons' state and logs
# live in $SD_SLURM_DIR (default /var/tmp/sd-slurm); /etc/slurm is not touched, so a machine's
# own cluster configuration is left alone: clients find this one through SLURM_CONF.
# Exit status: 0 done; 1 failed (the daemons' logs are printed); 3 cannot run here (not root, or
# no apt-get to install SLURM), with one line saying why.
set -uo pipefail

DIR=${SD_SLURM_DIR:-/var/tmp/sd-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

say() { echo "slurm_local: $*" >&2; }

cannot() { say "cannot run here: $*"; exit 3; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
  command -v sbatch >/dev/null && command -v munged >/dev/null; }

install() {
  installed && return 0
  [ "$(id -u)" = 0 ] || cannot "SLURM is not installed and installing it needs root"
  command -v apt-get >/dev/null || cannot "SLURM is not installed and there is no apt-get"
  say "installing slurmctld slurmd slurm-client munge (apt)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    slurmctld slurmd slurm-client munge >/dev/null || { say "apt-get install failed"; exit 1; }
}

write_conf() {
  local cpus mem
  cpus=$(nproc); [ "$cpus" -ge 2 ] || cpus=2
  mem=$(awk '/MemTotal/ {m = int($2 / 1024) - 1024; print (m < 2048 ? 2048 : m)}' /proc/meminfo)
  mkdir -p "$DIR/ctld" "$DIR/d"
  cat > "$CONF.new" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster.
ClusterName=sdlocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL at a requeue, cancel or time limit; generous for a
# loaded CI machine (clusters often keep the default 30).
KillWait=120
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; return 1; fi
  mv "$CONF.new" "$CONF"
  return 0
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key || return 1
  fi
  runuser -u munge -- munged || return 1
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

up() {
  scontrol ping 2>/dev/null | grep -q UP || return 1
  case "$(node_state)" in idle*|mixed*|allocated*|completing*) return 0 ;; *) return 1 ;; esac
}

stop() {
  local p
  for p in slurmd slurmctld; do
    if alive "$DIR/$p.pid"; then
      kill "$(cat "$DIR/$p.pid")"
      for _ in $(seq 100); do alive "$DIR/$p.pid" || break; sleep 0.1; done
    fi
  done
  # munged is stopped too: this script started it (nothing else on a test machine uses it).
  if munge -n >/dev/null 2>&1; then runuser -u munge -- munged --stop >/dev/null 2>&1 || true; fi
  say "stopped"
}

fail() {
  say "$*"
  for f in "$DIR/slurmctld.log" "$DIR/slurmd.log"; do
    [ -f "$f" ] && { echo "--- $f (last lines)" >&2; tail -20 "$f" >&2; }
  done
  exit 1
}

start() {
  [ "$(id -u)" = 0 ] || { up && return 0; cannot "starting slurmctld and slurmd needs root"; }
  install
  if write_conf; then  # a new configuration: restart whatever runs with the old one
    for p in slurmd slurmctld; do alive "$DIR/$p.pid" && kill "$(cat "$DIR/$p.pid")"; done
    sleep 1
  fi
  start_munge || fail "munged did not start"
  alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" || fail "slurmctld did not start"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  alive "$DIR/slurmd.pid" || slurmd -f "$CONF" -N localhost || fail "slurmd did not start"
  for _ in $(seq 150); do
    case "$(node_state)" in
      down*|drain*|fail*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 ;;
    esac
    up && { say "up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T') (SLURM_CONF=$CONF)"; return 0; }
    sleep 0.2
  done
  fail "the node did not become idle: $(node_state)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if up; then sinfo; squeue; else say "not running"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
