"""What every benchmark report records besides its numbers (the machine, peak memory), and how it
is written: JSON on stdout, and to a file when asked."""
from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path

import psutil
import torch

from ssl_foundry.pipeline.train.runtime import cpu_has_fast_bf16


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its (finished) children, e.g. loader workers."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def cpu() -> dict:
    """The CPU's model name and the flags that decide bf16 speed (figures differ between machines)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"cpu_model": model or platform.processor(),
            "cpu_flags": sorted(flags & {"avx2", "avx512_bf16", "amx_bf16"})}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), **cpu(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
            "cuda": torch.cuda.is_available()}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (torch loader workers)."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def write_report(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
