#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need: Debian packages (as root on Debian) and a .venv
# with the pinned Python dependencies and this project. Idempotent: a second run only checks.
# Without root the venv is made all the same; only the Debian packages need root, and the one
# apt-get command that installs them is printed, with what does not work until then.
#
# One line per step, saying what it waits for, ended by its time once done. The tools' own output
# goes to a log file, shown (its tail) only if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DEEPSPEED_VERSION=0.19.8
# Debian package -> what needs it.
declare -A NEEDED_BY=(
  [dataset-fashion-mnist]="the Fashion-MNIST recipes, make demo, foundry prep fashion-mnist and most tests"
  [opencv-doc]="foundry prep photos / sample-videos, the DALI loader, video and benchmark tests"
  [g++]="DeepSpeed's C++ ops (train.strategy=deepspeed)"
  [ninja-build]="DeepSpeed's C++ ops (train.strategy=deepspeed)"
)
APT_PACKAGES=(dataset-fashion-mnist opencv-doc g++ ninja-build)

installed_deb() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

LOG=""
started=$SECONDS

# step "what it does and waits for" command...: the line, the command (output to $LOG), the time.
step() {
  local what=$1 tic=$SECONDS
  shift
  [[ -n $LOG ]] || LOG=$(mktemp "${TMPDIR:-/tmp}/ssl-foundry-setup.XXXXXX.log")
  printf 'setup: %s ... ' "$what"
  if ! "$@" >>"$LOG" 2>&1; then
    echo "failed"
    tail -n 40 "$LOG" >&2
    echo "setup: the whole output is in $LOG" >&2
    exit 1
  fi
  echo "done in $((SECONDS - tic)) s"
}
missing_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  installed_deb "$pkg" || missing_apt+=("$pkg")
done
if ((${#missing_apt[@]})) && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  step "apt-get update (waits up to 5 min for another apt to finish)" \
    apt-get update -qq -o DPkg::Lock::Timeout=300
  step "apt-get install ${missing_apt[*]}" \
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing_apt[@]}"
  missing_apt=()
fi

report_missing_apt() {
  ((${#missing_apt[@]})) || return 0
  echo "setup: missing Debian packages; as root run:" >&2
  echo "  apt-get install --no-install-recommends ${missing_apt[*]}" >&2
  echo "  until then these do not work:" >&2
  for pkg in "${missing_apt[@]}"; do echo "    $pkg: ${NEEDED_BY[$pkg]}" >&2; done
  echo "  (elsewhere than Debian: Fashion-MNIST's idx files belong in /usr/share/datasets/fashion-mnist/," >&2
  echo "   OpenCV's sample photos and videos in /usr/share/doc/opencv-doc/)" >&2
}

stamp="$VENV/.installed"
if [[ -f $stamp && $stamp -nt requirements.txt && $stamp -nt pyproject.toml && $stamp -nt scripts/setup.sh ]]; then
  echo "setup: $VENV ready (up to date with requirements.txt; delete $stamp to reinstall)"
  report_missing_apt
  exit 0
fi
if [[ ! -x $VENV/bin/python ]]; then
  step "creating $VENV with $("$PYTHON" --version 2>&1)" "$PYTHON" -m venv "$VENV"
fi
# torch/torchvision resolve from this machine's local wheel index (pip.conf); plain pip, not uv.
step "pip install -r requirements.txt (torch, timm, mlflow, ...: ~2 min into a new $VENV)" \
  "$VENV/bin/pip" install --quiet -r <(grep -v '^nvidia-dali-' requirements.txt)
# DALI's wheels are per CUDA major version and install the same files (nvidia/dali/), so exactly one may
# be installed: that of torch's CUDA (requirements.txt pins cuda130, its torch being cu130; a torch built
# for CUDA 12 gets cuda120). Another flavour goes first: removing it after would delete shared files.
dali=$("$VENV/bin/python" -c 'import torch; print("nvidia-dali-cuda%s0" % (torch.version.cuda or "13").split(".")[0])')
for other in $("$VENV/bin/pip" freeze | sed -n 's/^\(nvidia-dali-cuda[0-9]*\)==.*/\1/p'); do
  [[ $other == "$dali" ]] || step "pip uninstall $other (DALI must match torch's CUDA)" \
    "$VENV/bin/pip" uninstall --quiet --yes "$other"
done
step "pip install $dali (a ~420 MB wheel)" \
  "$VENV/bin/pip" install --quiet "$dali==$(sed -n 's/^nvidia-dali-cuda130==//p' requirements.txt)"
# DeepSpeed (train.strategy=deepspeed) is built from its source here with the C++ ops this machine's
# CPU accelerator uses compiled now: CPU Adam (ZeRO-Offload) and the shared-memory collectives.
# Otherwise the first run (or test) JIT-compiles them for ~90 s. --no-build-isolation: its build
# imports the torch installed above; --no-cache-dir: a cached op-less wheel must not be reused. On a
# GPU machine DeepSpeed JIT-compiles its CUDA ops on first use instead (docs/deepspeed.md). Without a
# C++ toolchain it is installed without its ops (train.strategy=deepspeed then needs g++ and ninja).
deepspeed_ready() {
  DS_ACCELERATOR=cpu "$VENV/bin/python" -c "import sys, deepspeed.git_version_info as ds; ops = ds.installed_ops
sys.exit(not (ds.version == '$DEEPSPEED_VERSION' and ops.get('cpu_adam') and ops.get('deepspeed_shm_comm')))" 2>/dev/null
}
build_deepspeed() {
  "$VENV/bin/pip" uninstall --quiet --yes deepspeed 2>/dev/null || true  # an op-less build would count as installed
  DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
    "$VENV/bin/pip" install --quiet --no-build-isolation --no-cache-dir "deepspeed==$DEEPSPEED_VERSION"
}
if command -v g++ >/dev/null && command -v ninja >/dev/null; then
  if ! deepspeed_ready; then
    step "building DeepSpeed $DEEPSPEED_VERSION with its CPU ops cpu_adam and shm_comm (g++, ~90 s to 3 min)" \
      build_deepspeed
  fi
else
  step "pip install deepspeed==$DEEPSPEED_VERSION without its C++ ops (no g++ / ninja here)" \
    env DS_BUILD_OPS=0 "$VENV/bin/pip" install --quiet --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"
fi
step "pip install -e . (ssl-foundry itself, the foundry command)" \
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
touch "$stamp"
[[ -z $LOG ]] || rm -f "$LOG"
versions=$(DS_ACCELERATOR=cpu "$VENV/bin/python" -c 'import torch, timm, mlflow, nvidia.dali, deepspeed.git_version_info as ds; print("torch", torch.__version__, "timm", timm.__version__, "mlflow", mlflow.__version__, "dali", nvidia.dali.__version__, "deepspeed", ds.version, "ops", ",".join(k for k, v in ds.installed_ops.items() if v) or "none")')
echo "setup: $VENV ready in $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s ($versions)"
report_missing_apt
