#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for trying (and testing) ccar's Slurm paths without a cluster.
#
#   scripts/local-slurm.sh install    # Debian/Ubuntu as root: slurmctld slurmd slurm-client munge (`make test` does it)
#   scripts/local-slurm.sh start      # prints the line to export: SLURM_CONF=...; then `srun hostname` answers
#   scripts/local-slurm.sh status
#   scripts/local-slurm.sh stop       # stops the daemons this script started
#
# Needs root (munged and slurmd run as root here). State lives in $CCAR_SLURM_DIR (default /tmp/ccar-slurm).
# Process tracking is proctrack/linuxproc and task/none, so no cgroups are needed (containers work).
#
# The node is a small cluster's node, not an idealised one: it declares the CPUs and memory this machine really gives
# (an affinity mask or a cgroup quota counts), memory is a consumable resource (CR_Core_Memory, DefMemPerCPU) as on
# most clusters, and a request larger than the node pends with reason PartitionConfig, as Slurm does there.
# CCAR_SLURM_CPUS=N declares fewer CPUs than the machine has (a 2-CPU node on a big machine).
set -euo pipefail
DIR="${CCAR_SLURM_DIR:-/tmp/ccar-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

die() { echo "local-slurm: $*" >&2; exit 1; }

machine_cpus() {  # the CPUs this process may use (not plain nproc: it follows OMP_NUM_THREADS)
  local n quota period
  n="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # the affinity mask
  if [ -r /sys/fs/cgroup/cpu.max ]; then  # a cgroup v2 quota: "max 100000" or "200000 100000"
    read -r quota period < /sys/fs/cgroup/cpu.max
  elif [ -r /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then  # cgroup v1: -1 when unlimited
    quota="$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)"; period="$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"
  fi
  if [ -n "${quota:-}" ] && [ "$quota" != max ] && [ "$quota" -gt 0 ]; then
    quota=$(( (quota + period - 1) / period ))
    [ "$quota" -lt "$n" ] && n="$quota"
  fi
  echo "$n"
}

machine_mem_mb() {  # nine tenths (the OS keeps some) of the memory this machine gives: MemTotal, or a lower cgroup limit
  local bytes limit f
  bytes=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) * 1024 ))  # (in the shell: mawk's integers stop at 2^31)
  for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
    if [ -r "$f" ]; then
      limit="$(cat "$f")"
      [ "$limit" != max ] && [ "$limit" -lt "$bytes" ] && bytes="$limit"
      break
    fi
  done
  echo $(( bytes / 1024 / 1024 * 9 / 10 ))
}

start() {
  for b in munged slurmctld slurmd srun; do
    command -v "$b" >/dev/null || die "$b not found; install: apt-get install -y slurmctld slurmd slurm-client munge"
  done
  [ "$(id -u)" = 0 ] || die "run as root (munged and slurmd need it)"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  if ! pgrep -x munged >/dev/null; then
    munged --force
  fi
  local cpus mem
  cpus="${CCAR_SLURM_CPUS:-$(machine_cpus)}"
  [ "$cpus" -ge 1 ] && [ "$cpus" -le "$(machine_cpus)" ] \
    || die "CCAR_SLURM_CPUS=$cpus: give 1 to $(machine_cpus) (Slurm marks a node with more CPUs than it has INVAL)"
  mem="$(machine_mem_mb)"
  cat > "$CONF" <<EOF
ClusterName=ccar-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
JobRequeue=1
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmdSpoolDir=$DIR/spool
StateSaveLocation=$DIR/state
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$CONF"
  pgrep -f "slurmctld -f $CONF" >/dev/null || slurmctld -f "$CONF"
  pgrep -f "slurmd -f $CONF" >/dev/null || slurmd -f "$CONF"
  for _ in $(seq 1 40); do
    if timeout 10 srun -N1 -t 1 hostname >/dev/null 2>&1; then
      echo "local-slurm: up ($HOST, $cpus CPUs, $mem MB). Use it with: export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 0.5
  done
  die "the cluster did not answer \`srun hostname\`; logs: $DIR/slurmctld.log, $DIR/slurmd.log"
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v srun >/dev/null; then
    return 0
  fi
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "local-slurm: installing Debian's slurmctld, slurmd, slurm-client and munge"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
  else
    echo "local-slurm: Slurm is not installed and cannot be here (needs apt-get as root); its tests will skip"
  fi
}

stop() {
  pkill -f "slurmd -f $CONF" 2>/dev/null || true
  pkill -f "slurmctld -f $CONF" 2>/dev/null || true
  for _ in $(seq 1 20); do
    pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || break
    sleep 0.25
  done
  echo "local-slurm: stopped (munged is left running; state in $DIR)"
}

status() {
  export SLURM_CONF="$CONF"
  if pgrep -f "slurmctld -f $CONF" >/dev/null && timeout 10 sinfo >/dev/null 2>&1; then
    sinfo
  else
    echo "local-slurm: not running"; return 1
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
