"""The `foundry bench` command group: each benchmark module's ``add_parser(kinds)`` adds its
sub-command and sets ``func`` (called with the parsed args, returns the exit code)."""
from __future__ import annotations

from ssl_foundry.launch.bench import loader, prep, quality, scaling, strategies, temporal_order, train, video

BENCHMARKS = (train, prep, loader, strategies, scaling, quality, video, temporal_order)


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON")
    kinds = p.add_subparsers(dest="kind", required=True)
    for benchmark in BENCHMARKS:
        benchmark.add_parser(kinds)
