"""Local and multi-node launch through torch's elastic launcher (what torchrun runs), so
``foundry pretrain cfg launch.nproc_per_node=4`` and ``torchrun --nproc-per-node 4 -m ssl_foundry.launch
pretrain cfg`` start the same ranks with the same environment.

Several nodes (docs/multinode.md): every node runs the same command. Its agent meets the others in
a c10d rendezvous at ``launch.rdzv_endpoint`` under one name every node derives alike
(``rendezvous_id``), then starts ``launch.nproc_per_node`` ranks. After a failure the agents meet
again, up to ``launch.max_restarts`` times, and the ranks resume from the newest checkpoint.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import socket
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import psutil
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, get_error_handler
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError
from torch.distributed.launcher.api import LaunchConfig as ElasticConfig
from torch.distributed.launcher.api import elastic_launch

from ssl_foundry.pipeline.config import Config, ConfigError, config_from_dict, max_restarts, to_dict
from ssl_foundry.pipeline.train.run import run_pretraining


class NodeLostError(RuntimeError):
    """A multi-node job lost a node for good: it did not rejoin within ``launch.join_timeout_s``,
    or it was the head, whose agent hosted the rendezvous store."""


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
    return run_pretraining(config_from_dict(config))


def rendezvous_id(cfg: Config) -> str:
    """``launch.rdzv_id``, or a name every node computes alike from the ``output_dir`` string."""
    return cfg.launch.rdzv_id or f"foundry-{hashlib.sha256(cfg.output_dir.encode()).hexdigest()[:16]}"


def _endpoint_address(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    try:
        return socket.getaddrinfo(host.strip("[]"), int(port), proto=socket.IPPROTO_TCP)[0][4][0], int(port)
    except socket.gaierror as err:
        raise ConfigError(f"launch.rdzv_endpoint={endpoint}: '{host}' does not resolve ({err.strerror}); use the "
                          f"head node's address") from None


def node_network(endpoint: str) -> tuple[str, str, bool]:
    """(this node's address towards ``endpoint``, the interface holding it, whether the endpoint is
    one of this node's own addresses: then its agent hosts the rendezvous store).

    Asked of the kernel's routing (a UDP socket's connect sends nothing), not of the hostname,
    which in a network namespace or on a multi-homed machine names some other interface."""
    address, port = _endpoint_address(endpoint)
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((address, port))
        local = probe.getsockname()[0]
    owners = {snic.address.split("%")[0]: name for name, snics in psutil.net_if_addrs().items() for snic in snics
              if snic.family == family}
    return local, owners.get(local, ""), address in owners


def elastic_config(cfg: Config) -> ElasticConfig:
    launch = cfg.launch
    common = dict(max_nodes=launch.nnodes, nproc_per_node=launch.nproc_per_node, run_id=rendezvous_id(cfg),
                  rdzv_backend="c10d", max_restarts=max_restarts(launch), monitor_interval=1)
    if launch.nnodes == 1:  # a free port chosen by the launcher, like `torchrun --standalone`
        return ElasticConfig(min_nodes=1, rdzv_endpoint="127.0.0.1:0", **common)
    local_addr, interface, is_host = node_network(launch.rdzv_endpoint)
    rdzv_configs: dict[str, Any] = {"join_timeout": launch.join_timeout_s, "last_call_timeout": launch.last_call_s}
    if not ipaddress.ip_address(local_addr).is_loopback:
        # Several agents on one machine (127.0.0.1) are left to torch: the first to bind the port hosts.
        rdzv_configs["is_host"] = is_host
    if interface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)  # the ranks' gloo traffic takes that route too
    # Each round's rank-0 node serves the ranks' store afresh: torch's shared store would keep
    # pointing at a lost rank-0 node's after a restart.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return ElasticConfig(min_nodes=launch.min_nodes or launch.nnodes, rdzv_endpoint=launch.rdzv_endpoint,
                         rdzv_configs=rdzv_configs, local_addr=local_addr, **common)


def _run_rank(entry: Callable, *args: Any):
    """``entry(*args)`` as one rank of a launched job. A rank that fails records its exception for
    the agent (the error file ``RanksFailed`` is read from) and ends at once: Python's teardown of
    torch, timm and MLflow (seconds; tens on a busy machine) would hold back the agent's restart of
    every rank."""
    try:
        return entry(*args)
    except Exception as err:
        get_error_handler().record_exception(err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def launch_ranks(cfg: Config, entry: Callable, *args: Any):
    """``entry(*args)`` in this process, or in ``launch.nproc_per_node`` ranks per node (``entry``
    and ``args`` must pickle); returns rank 0's result (None on the nodes without rank 0). A failed
    rank: ``RanksFailed``; a node lost for good: ``NodeLostError``."""
    if cfg.launch.nproc_per_node == 1 and cfg.launch.nnodes == 1 or under_launcher():
        return entry(*args)  # under torchrun or Slurm, the CLI still reports the rank's own error in one line
    elastic = elastic_config(cfg)
    try:
        with _quiet_elastic_logs():
            results = elastic_launch(elastic, _run_rank)(entry, *args)
    except ChildFailedError as err:
        raise _ranks_failed(err) from None
    except RendezvousTimeoutError as err:
        launch = cfg.launch
        raise NodeLostError(
            f"the nodes did not meet within launch.join_timeout_s={launch.join_timeout_s}: rendezvous "
            f"'{elastic.run_id}' at {launch.rdzv_endpoint} needs {elastic.min_nodes} of launch.nnodes="
            f"{launch.nnodes} nodes. Start the missing nodes' command (a lost node's own command, restarted, "
            f"resumes from the newest checkpoint), or set launch.min_nodes lower to go on without them") from err
    except RendezvousConnectionError as err:
        raise NodeLostError(
            f"lost the rendezvous store at launch.rdzv_endpoint={cfg.launch.rdzv_endpoint}: the head node's agent "
            f"hosts it, and the job cannot go on without it. Start every node's command again: they resume "
            f"from the newest checkpoint") from err
    return results.get(0)


def launch_pretrain(cfg: Config):
    """Run pretraining: in this process, or as ``launch.nproc_per_node`` ranks per node."""
    return launch_ranks(cfg, _rank_entry, to_dict(cfg))
