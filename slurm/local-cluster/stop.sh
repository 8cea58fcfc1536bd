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

stop_pidfiles() {  # stop_pidfiles FILE...: SIGTERM all, wait for all (SIGKILL after 15 s)
  local f pid names=() pids=() files=()
  for f in "$@"; do
    if pid=$(pid_of "$f"); then
      pids+=("$pid"); files+=("$f"); names+=("$(basename "$f" .pid)")
      kill -TERM "$pid" 2>/dev/null || true
    else
      rm -f "$f"
    fi
  done
  local i
  for i in "${!pids[@]}"; do
    for _ in $(seq 150); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      log "${names[$i]} (${pids[$i]}) ignored SIGTERM for 15 s: SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    fi
    rm -f "${files[$i]}"
    log "stopped ${names[$i]} (${pids[$i]})"
  done
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

# Slurm daemons together, then what they use (slurmdbd flushes to MariaDB before it exits).
shopt -s nullglob
stop_pidfiles "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid"
stop_pidfiles "$RUN/mysql/mariadbd.pid" "$RUN/munged.pid"

if ((PURGE)); then
  [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$STATE/etc/slurm.conf" ]] \
    && rm -f /etc/slurm/slurm.conf
  rm -rf "$STATE"
  log "removed $STATE"
fi
log "stopped"
