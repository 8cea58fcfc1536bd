#!/usr/bin/env bash
# Stops the local Slurm cluster started by start.sh: cancels every job first (job steps outlive a
# killed slurmd), then stops slurmd(s), slurmctld, slurmdbd, MariaDB and munged by their PID files
# (SIGTERM, then SIGKILL after 15 s). Idempotent: what is not running is skipped.
#
#   sudo slurm/local-cluster/stop.sh [--purge] [--quiet]
#   --purge  also delete the state dir (Slurm state, job ids, accounting database, logs)
set -euo pipefail

STATE=${FOUNDRY_SLURM_STATE:-/var/tmp/foundry-slurm}
PURGE=0 QUIET=0
for arg in "$@"; do
  case $arg in
    --purge) PURGE=1 ;;
    --quiet) QUIET=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "stop.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "stop.sh: must run as root" >&2; exit 1; }
log() { ((QUIET)) || echo "[local-slurm] $*"; }

RUN=$STATE/run
export SLURM_CONF=$STATE/etc/slurm.conf

pid_of() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null && cat "$1"; }

stop_pidfile() {  # stop_pidfile NAME FILE
  local pid
  pid=$(pid_of "$2") || { rm -f "$2"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$1 ($pid) ignored SIGTERM for 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$2"
  log "stopped $1 ($pid)"
}

if pid_of "$RUN/slurmctld.pid" >/dev/null && [[ -f $SLURM_CONF ]]; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 150); do [[ -z $(squeue -h -o %A 2>/dev/null | head -1) ]] && break; sleep 0.1; done
  fi
fi

for f in "$RUN"/slurmd-*.pid; do
  [[ -e $f ]] || continue
  name=$(basename "$f" .pid)
  stop_pidfile "$name" "$f"
done
stop_pidfile slurmctld "$RUN/slurmctld.pid"
stop_pidfile slurmdbd "$RUN/slurmdbd.pid"
stop_pidfile mariadbd "$RUN/mysql/mariadbd.pid"
stop_pidfile munged "$RUN/munged.pid"

if ((PURGE)); then
  [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$STATE/etc/slurm.conf" ]] \
    && rm -f /etc/slurm/slurm.conf
  rm -rf "$STATE"
  log "removed $STATE"
fi
log "stopped"
