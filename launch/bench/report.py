"""What every benchmark report records besides its numbers (the machine, peak memory), and how it
is written: JSON on stdout, and to a file when asked."""
from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory of this process and of its (finished) children, e.g. loader workers."""
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def machine() -> dict:
    import torch

    from ssl_foundry.pipeline.train.runtime import cpu_has_fast_bf16

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
            "cuda": torch.cuda.is_available()}


def write_report(report: dict, out: str | None) -> None:
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
