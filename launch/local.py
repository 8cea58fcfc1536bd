"""Local multi-process launch through torch's elastic launcher (what torchrun runs), so
``foundry pretrain cfg launch.nproc_per_node=4`` and ``torchrun --nproc-per-node 4 -m ssl_foundry.launch
pretrain cfg`` start the same ranks with the same environment."""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from ssl_foundry.pipeline.config import Config, config_from_dict, to_dict


def under_launcher() -> bool:
    """True inside a rank started by torchrun / elastic launch / submitit."""
    return "LOCAL_RANK" in os.environ or "SLURM_PROCID" in os.environ and "RANK" in os.environ


def _rank_entry(config: dict[str, Any]):
    from ssl_foundry.pipeline.train.run import run_pretraining

    return run_pretraining(config_from_dict(config))


def launch_ranks(cfg: Config, entry: Callable, *args: Any):
    """``entry(*args)`` in this process, or in ``launch.nproc_per_node`` ranks per node (``entry``
    and ``args`` must pickle); returns rank 0's result."""
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
    results = elastic_launch(elastic, entry)(*args)
    return results[0]


def launch_pretrain(cfg: Config):
    """Run pretraining: in this process, or as ``launch.nproc_per_node`` ranks per node."""
    return launch_ranks(cfg, _rank_entry, to_dict(cfg))
