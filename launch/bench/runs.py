"""The pretraining runs that the run-based benchmarks (strategies, quality, temporal-order) compare:
each is `foundry pretrain` in a process of its own, its output in a log file, its numbers in the
run folder's result.json."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pretrain_process(recipe: str, overrides: list[str], log_path: Path) -> subprocess.CompletedProcess:
    """`foundry pretrain RECIPE OVERRIDES` (this Python, this installation), stdout and stderr to
    ``log_path``; returns when it has finished."""
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, "-m", "ssl_foundry.launch", "pretrain", recipe, *overrides],
                              stdout=log, stderr=subprocess.STDOUT)


def shipped_recipes(pattern: str) -> list[str]:
    """The recipes ``configs/<pattern>`` of the checkout the command runs in (the default of
    ``--recipe``); none found is an error saying what to do."""
    found = sorted(str(p) for p in Path("configs").glob(pattern))
    if not found:
        raise SystemExit(f"foundry bench: no configs/{pattern} here ({Path.cwd()}): run it from the ssl-foundry "
                         f"checkout, or name recipes with --recipe")
    return found
