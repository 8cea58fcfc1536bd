"""Which GPUs DALI has passed `foundry check gpu` on (docs/gpu-acceptance.md).

``data.backend=auto`` picks the DALI loader on a GPU only where the check's DALI item has passed:
its `mixed` decode and GPU augmentation graph ran and agreed with the torch loader on the same
shards and spec. The check leaves a small record per (GPU model, DALI version and CUDA flavour)
in the user's cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``, then
``ssl-foundry/dali-accepted/``); a later failing check removes it. Until a record exists the
torch loader trains, and the trainer's "training loader" line says why.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

CHECK_COMMAND = "foundry check gpu"


def dali_build() -> str:
    """The installed DALI as ``<version>-cuda<major>`` (the wheel flavour matters: the cuda120 and
    cuda130 wheels share a version number). Raises ImportError without DALI."""
    import nvidia.dali  # optional (the [dali] extra): ImportError without it, as said above

    return f"{nvidia.dali.__version__}-cuda{int(nvidia.dali.__cuda_version__) // 1000}"


def record_path(gpu_name: str, build: str) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu_name).strip("-")
    return cache / "ssl-foundry" / "dali-accepted" / f"{slug}-dali-{build}.json"


def record_acceptance(gpu_name: str, build: str, evidence: dict) -> Path:
    """Remember that DALI ``build`` passed the check on ``gpu_name`` (atomic write)."""
    path = record_path(gpu_name, build)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump({"gpu": gpu_name, "dali": build, **evidence}, tmp, indent=2)
    os.replace(tmp.name, path)
    return path


def withdraw_acceptance(gpu_name: str, build: str) -> None:
    record_path(gpu_name, build).unlink(missing_ok=True)


def dali_accepted(gpu_name: str, build: str) -> bool:
    return record_path(gpu_name, build).is_file()


def auto_backend_on_gpu(gpu_name: str) -> tuple[str, str]:
    """``data.backend=auto`` on a GPU with image shards: (backend, why)."""
    try:
        build = dali_build()
    except ImportError:
        return "torch", "auto: DALI is not installed"
    if dali_accepted(gpu_name, build):
        return "dali", f"auto: DALI {build} passed `{CHECK_COMMAND}` on {gpu_name}"
    return "torch", (f"auto: DALI {build} has not passed `{CHECK_COMMAND}` on {gpu_name} yet; run it once to "
                     f"train with DALI here (docs/gpu-acceptance.md), or set data.backend=dali")
