"""The `foundry` command (also `python -m ssl_foundry.launch`).

Each command group lives beside the code it drives and contributes its sub-parser through
an ``add_parser(subparsers)`` function that sets ``func`` (called with the parsed args,
returns the exit code).
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

from ssl_foundry.data_prep.console import setup_logging
from ssl_foundry.pipeline.config import ConfigError
from ssl_foundry.pipeline.extras import install_hint


def build_parser() -> argparse.ArgumentParser:
    from ssl_foundry.data_prep.cli import add_parser as add_prep
    from ssl_foundry.launch.bench.cli import add_parser as add_bench
    from ssl_foundry.launch.check_gpu import add_parser as add_check
    from ssl_foundry.launch.commands import add_eval_parser, add_pretrain_parser, add_registry_parser
    from ssl_foundry.launch.slurm import add_parser as add_submit

    parser = argparse.ArgumentParser(prog="foundry", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('ssl-foundry')}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prep(sub)
    add_pretrain_parser(sub)
    add_eval_parser(sub)
    add_registry_parser(sub)
    add_submit(sub)
    add_bench(sub)
    add_check(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, leftover = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so overrides written after
    # one (`eval knn CFG --backbone X k=v`) come back here; they are still overrides.
    if leftover and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in leftover):
        args.overrides = list(args.overrides) + leftover
    elif leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    setup_logging()  # log lines and progress to stderr; results (JSON, summaries) to stdout
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"foundry: config error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional part that is not installed: say which extra has it
        hint = install_hint(err.name)
        if hint is None:
            raise
        print(f"foundry {args.command}: {err.name} is not installed: {hint}", file=sys.stderr)
        return 1
