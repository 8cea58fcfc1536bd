#!/usr/bin/env bash
# A real Slurm cluster on this one Debian machine, for the tests and for trying `foundry submit`:
# munge, MariaDB (127.0.0.1 only) + slurmdbd (accounting, so sacct/submitit see CANCELLED and
# FAILED), slurmctld and N slurmd daemons that pose as nodes n1..nN. No systemd: every daemon is
# started directly and leaves a PID file under the state dir; stop.sh stops them by PID.
#
#   sudo slurm/local-cluster/start.sh [--nodes N]     (default 2; N=1..4)
#   export SLURM_CONF=/var/tmp/foundry-slurm/etc/slurm.conf   (printed at the end)
#   sinfo; srun -N2 hostname; foundry submit configs/x.yaml launch.partition=debug ...
#   sudo slurm/local-cluster/stop.sh [--purge]
#
# Needs root and Debian/Ubuntu (apt-get). Idempotent: when the cluster is already up with the same
# number of nodes it only reports; otherwise it (re)starts what is needed. Environment:
#   FOUNDRY_SLURM_STATE   state dir (configs, spool, logs, PID files, database)  [/var/tmp/foundry-slurm]
#   FOUNDRY_SLURM_DB_PORT MariaDB port on 127.0.0.1                               [3307]
#   FOUNDRY_SLURM_PORT_BASE slurmctld=BASE, slurmdbd=BASE+2, node i: BASE+10+i      [6817]
#   FOUNDRY_SLURM_ETC_LINK  1: link /etc/slurm/slurm.conf to this cluster's config (if no real one)  [1]
set -euo pipefail

NODES=${FOUNDRY_SLURM_NODES:-2}
while (($#)); do
  case $1 in
    --nodes) NODES=$2; shift 2 ;;
    --nodes=*) NODES=${1#*=}; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $NODES =~ ^[1-4]$ ]] || { echo "start.sh: --nodes must be 1..4, got '$NODES'" >&2; exit 2; }

STATE=${FOUNDRY_SLURM_STATE:-/var/tmp/foundry-slurm}
DB_PORT=${FOUNDRY_SLURM_DB_PORT:-3307}
PORT_BASE=${FOUNDRY_SLURM_PORT_BASE:-6817}
CLUSTER=foundry
PARTITION=debug
HERE=$(cd "$(dirname "$0")" && pwd)

# The daemons run as their own users (mysql, slurm): they use the system's temp folder, never a
# caller's TMPDIR, which may be private to the caller (MariaDB's InnoDB fails to start there).
unset TMPDIR
die() { echo "start.sh: $*" >&2; exit 1; }
log() { echo "[local-slurm] $*"; }

[[ $(id -u) == 0 ]] || die "must run as root (it installs Debian packages and starts system daemons); try: sudo $0"
[[ -f /etc/debian_version ]] && command -v apt-get >/dev/null \
  || die "needs Debian/Ubuntu with apt-get (found: $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-unknown OS}"))"

# ---------------------------------------------------------------- packages
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq -o DPkg::Lock::Timeout=300
  # The packages try to start their services; without systemd that is refused (policy-rc.d), fine.
  apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi

export SLURM_CONF=$STATE/etc/slurm.conf
RUN=$STATE/run
LOGS=$STATE/log

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Already up with the same shape? Then only report.
if alive "$RUN/slurmctld.pid" && alive "$RUN/slurmdbd.pid" && [[ -f $STATE/nodes && $(cat "$STATE/nodes") == "$NODES" ]]; then
  all_up=1
  for i in $(seq 1 "$NODES"); do alive "$RUN/slurmd-n$i.pid" || all_up=0; done
  if ((all_up)) && sinfo -h >/dev/null 2>&1; then
    log "already running ($NODES node(s)); export SLURM_CONF=$SLURM_CONF"
    sinfo
    exit 0
  fi
fi
# Anything half up (or another node count): stop it first, keeping the state (job ids, database).
"$HERE/stop.sh" --quiet || true

mkdir -p "$STATE/etc" "$RUN" "$LOGS" "$STATE/slurmctld" "$STATE/slurmd" "$STATE/mysql"
echo "$NODES" >"$STATE/nodes"

# ---------------------------------------------------------------- munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
  # stop.sh stops munged only if this script started it
  cp /run/munge/munged.pid "$RUN/munged.pid"
fi

# ---------------------------------------------------------------- MariaDB (127.0.0.1 only)
DB=$STATE/mysql
DBRUN=$RUN/mysql  # socket, PID file and log: written by the mysql user
install -d -o mysql -g mysql "$DB" "$DBRUN"
if [[ ! -d $DB/mysql ]]; then
  log "initialising MariaDB in $DB"
  mariadb-install-db --user=mysql --datadir="$DB" --auth-root-authentication-method=socket \
    --skip-test-db >"$LOGS/mariadb-install.log" 2>&1 || die "mariadb-install-db failed: $LOGS/mariadb-install.log"
fi
setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB" --socket="$DBRUN/mysqld.sock" \
  --pid-file="$DBRUN/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --log-error="$DBRUN/mariadb.log" \
  --innodb-buffer-pool-size=64M --skip-name-resolve </dev/null >/dev/null 2>&1 &
for _ in $(seq 100); do
  mariadb-admin --socket="$DBRUN/mysqld.sock" -u root ping >/dev/null 2>&1 && break
  sleep 0.2
done
mariadb-admin --socket="$DBRUN/mysqld.sock" -u root ping >/dev/null 2>&1 || die "MariaDB did not start: $DBRUN/mariadb.log"
[[ -f $STATE/etc/db.pass ]] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/etc/db.pass")
DB_PASS=$(cat "$STATE/etc/db.pass")
mariadb --socket="$DBRUN/mysqld.sock" -u root <<SQL
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# ---------------------------------------------------------------- configs
HOST=$(hostname -s)
CPUS=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)
MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
NODE_MEM=$((MEM * 8 / 10 / NODES))  # below what slurmd measures, or the node drains
cat >"$STATE/etc/slurm.conf" <<CONF
# Written by slurm/local-cluster/start.sh: $NODES fake node(s) on $HOST, everything on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_BASE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job with no --mem takes a whole node and the next one waits forever.
DefMemPerCPU=1024
ReturnToService=2
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5,bf_interval=5
KillWait=5
MinJobAge=300
InactiveLimit=0
Waittime=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT_BASE + 2))
JobAcctGatherType=jobacct_gather/none
CONF
nodes_list=()
for i in $(seq 1 "$NODES"); do
  echo "NodeName=n$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT_BASE + 10 + i)) CPUs=$CPUS RealMemory=$NODE_MEM State=UNKNOWN" >>"$STATE/etc/slurm.conf"
  nodes_list+=("n$i")
done
echo "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$STATE/etc/slurm.conf"

(umask 077; cat >"$STATE/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$HOST
DbdPort=$((PORT_BASE + 2))
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
)
# So plain `sinfo`/`sbatch` work without SLURM_CONF: point /etc/slurm/slurm.conf here, unless a
# real configuration is already there.
if [[ ${FOUNDRY_SLURM_ETC_LINK:-1} == 1 && ( ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ) ]]; then
  mkdir -p /etc/slurm && ln -sfn "$STATE/etc/slurm.conf" /etc/slurm/slurm.conf
fi

# ---------------------------------------------------------------- slurmdbd, slurmctld, slurmd
slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF; daemonizes
for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd did not answer: $LOGS/slurmdbd.log"
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null

slurmctld -f "$SLURM_CONF"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
scontrol ping | grep -q UP || die "slurmctld did not start: $LOGS/slurmctld.log"
for n in "${nodes_list[@]}"; do
  mkdir -p "$STATE/slurmd/$n"
  slurmd -f "$SLURM_CONF" -N "$n"
done

# Wait until every node is idle (resumes nodes left DOWN by an earlier stop).
for _ in $(seq 150); do
  idle=$(sinfo -h -N -o '%N %T' | awk '$2 == "idle"' | wc -l)
  ((idle == NODES)) && break
  if sinfo -h -N -o '%T' | grep -qE 'down|drain'; then
    scontrol update NodeName="$(IFS=,; echo "${nodes_list[*]}")" State=RESUME 2>/dev/null || true
  fi
  sleep 0.2
done
((idle == NODES)) || { sinfo -N -l >&2; die "nodes not idle after 30 s: $LOGS/slurmd-n*.log, $LOGS/slurmctld.log"; }

cat >"$STATE/env" <<ENV
export SLURM_CONF=$SLURM_CONF
ENV
log "up: $NODES node(s) (${nodes_list[*]}) x $CPUS CPUs, partition '$PARTITION', accounting on. State: $STATE"
log "use it with: export SLURM_CONF=$SLURM_CONF   (or: source $STATE/env)"
sinfo
