#!/usr/bin/env bash
# Sets up everything `make demo` and `make test` need: Debian packages (when root on Debian)
# and a .venv with the pinned Python dependencies. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Fashion-MNIST (recipes, tests); OpenCV's sample photos (DALI loader tests, `foundry prep photos`).
APT_PACKAGES=(dataset-fashion-mnist opencv-doc)

missing_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing_apt+=("$pkg")
done
if ((${#missing_apt[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq -o DPkg::Lock::Timeout=300
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing_apt[@]}"
  else
    echo "setup: missing system packages: ${missing_apt[*]}" >&2
    echo "  on Debian/Ubuntu run as root: apt-get install --no-install-recommends ${missing_apt[*]}" >&2
    echo "  elsewhere: Fashion-MNIST's idx files must be in /usr/share/datasets/fashion-mnist/ and OpenCV's" >&2
    echo "  sample photos in /usr/share/doc/opencv-doc/examples/data/" >&2
    exit 1
  fi
fi

stamp="$VENV/.installed"
if [[ -f $stamp && $stamp -nt requirements.txt && $stamp -nt pyproject.toml ]]; then
  exit 0
fi
if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
# torch/torchvision resolve from this machine's local wheel index (pip.conf); plain pip, not uv.
"$VENV/bin/pip" install --quiet -r requirements.txt
"$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
touch "$stamp"
echo "setup: $VENV ready ($("$VENV/bin/python" -c 'import torch, timm, mlflow, nvidia.dali; print("torch", torch.__version__, "timm", timm.__version__, "mlflow", mlflow.__version__, "dali", nvidia.dali.__version__)'))"
