"""Local multi-process launch through torch's elastic launcher (what torchrun runs), so
``foundry pretrain cfg launch.nproc_per_node=4`` and ``torchrun --nproc-per-node 4 -m ssl_foundry.launch
pretrain cfg`` start the same ranks with the same environment."""
from __future__ import annotations

import logging
import os
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from ssl_foundry.pipeline.config import Config, config_from_dict, to_dict


class RanksFailed(Exception):
    """A rank raised ``error_type``(``message``). ``details`` is torch elastic's report of the
    failure (the root cause's traceback), for errors the CLI does not explain in one line."""

    def __init__(self, error_type: str, message: str, details: str):
        super().__init__(f"{error_type}: {message}")
        self.error_type, self.message, self.details = error_type, message, details


def _ranks_failed(err: ChildFailedError) -> RanksFailed:
    """The failure of the rank that failed first, preferring one that raised an exception (a rank
    killed by the launcher after another failed has no exception of its own)."""
    failures = sorted(err.failures.values(), key=lambda f: (not isinstance(f.message, dict), f.timestamp))
    text = failures[0].message["message"] if isinstance(failures[0].message, dict) else str(failures[0].message)
    error_type, _, message = text.partition(": ")
    return RanksFailed(error_type, message, str(err))


@contextmanager
def _quiet_elastic_logs() -> Iterator[None]:
    """torch elastic logs a failed rank's traceback and the SIGTERMs it sends the others: the CLI
    reports the failure itself (one line for the errors it can explain, the traceback otherwise)."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed.elastic")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def under_launcher() -> bool:
    """True inside a rank started by torchrun / elastic launch / submitit."""
    return "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ and "RANK" in os.environ


def _rank_entry(config: dict[str, Any]):
    from ssl_foundry.pipeline.evaluate.knn import attach_knn_monitor
    from ssl_foundry.pipeline.train.trainer import train

    cfg = config_from_dict(config)
    return train(cfg, setup=attach_knn_monitor if cfg.eval.knn_every else None)


def launch_ranks(cfg: Config, entry: Callable, *args: Any):
    """``entry(*args)`` in this process, or in ``launch.nproc_per_node`` ranks per node (``entry``
    and ``args`` must pickle); returns rank 0's result. A failed rank: ``RanksFailed``."""
    if cfg.launch.nproc_per_node == 1 and cfg.launch.nnodes == 1 or under_launcher():
        return entry(*args)
    single_node = cfg.launch.nnodes == 1
    elastic = ElasticConfig(
        min_nodes=cfg.launch.nnodes,
        max_nodes=cfg.launch.nnodes,
        nproc_per_node=cfg.launch.nproc_per_node,
        run_id=os.environ.get("FOUNDRY_RUN_ID", uuid.uuid4().hex[:12]),
        rdzv_backend="c10d",
        # one node: a free port chosen by the launcher, like `torchrun --standalone`
        rdzv_endpoint="127.0.0.1:0" if single_node else cfg.launch.rdzv_endpoint,
        max_restarts=0,
        monitor_interval=1,
    )
    try:
        with _quiet_elastic_logs():
            results = elastic_launch(elastic, entry)(*args)
    except ChildFailedError as err:
        raise _ranks_failed(err) from None
    return results[0]


def launch_pretrain(cfg: Config):
    """Run pretraining: in this process, or as ``launch.nproc_per_node`` ranks per node."""
    return launch_ranks(cfg, _rank_entry, to_dict(cfg))
