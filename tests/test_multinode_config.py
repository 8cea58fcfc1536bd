"""The multi-node launch keys: the rendezvous id every node derives alike, the node's address and
store role from the routing table, and the config errors that name their fix before any node starts."""
import os

import pytest

from conftest import RECIPE
from ssl_foundry.launch.local import elastic_config, node_network, rendezvous_id
from ssl_foundry.pipeline.config import ConfigError, load_config


def config(*overrides: str):
    return load_config(RECIPE, list(overrides), check_paths=False)


def test_rendezvous_id_is_the_same_on_every_node_and_differs_per_output_dir():
    a, b = config("output_dir=/shared/runs/a", "launch.nnodes=2"), config("output_dir=/shared/runs/a", "launch.nnodes=2")
    assert rendezvous_id(a) == rendezvous_id(b)  # two nodes loading the same command
    assert rendezvous_id(a) != rendezvous_id(config("output_dir=/shared/runs/b"))
    assert rendezvous_id(config("launch.rdzv_id=job-7")) == "job-7"


def test_node_address_and_store_host_come_from_the_routing_table():
    assert node_network("127.0.0.1:29500") == ("127.0.0.1", "lo", True)
    with pytest.raises(ConfigError, match="launch.rdzv_endpoint=no-such-host.invalid:29500: 'no-such-host.invalid' "
                                          "does not resolve"):
        node_network("no-such-host.invalid:29500")


def test_elastic_launch_settings(monkeypatch):
    for name in ("GLOO_SOCKET_IFNAME", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):  # set for the ranks: restored after
        monkeypatch.delenv(name, raising=False)
    single = elastic_config(config("launch.nproc_per_node=2"))
    assert (single.min_nodes, single.max_nodes, single.max_restarts, single.rdzv_endpoint) == (1, 1, 0, "127.0.0.1:0")
    two = elastic_config(config("launch.nnodes=2", "launch.min_nodes=1", "data.readers=2", "launch.join_timeout_s=60",
                                "launch.rdzv_endpoint=127.0.0.1:29500"))
    assert (two.min_nodes, two.max_nodes, two.max_restarts, two.local_addr) == (1, 2, 3, "127.0.0.1")
    assert {"join_timeout": 60, "last_call_timeout": 30}.items() <= two.rdzv_configs.items()
    # 127.0.0.1: several agents on one machine; the first to bind the port hosts the store
    assert "is_host" not in two.rdzv_configs
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


@pytest.mark.parametrize("overrides, message", [
    (["launch.nnodes=2", "launch.min_nodes=1"], "set it .e.g. data.readers=2."),
    (["launch.nnodes=2", "launch.min_nodes=1", "data.readers=2", "train.strategy=deepspeed",
      "train.optimizer=adamw"], "train.strategy=deepspeed cannot .its optimizer shards are per rank."),
    (["launch.nnodes=4", "launch.min_nodes=1", "data.readers=4", "train.batch_size=12"],
     "on 3 node.s., 3 ranks, train.batch_size=12 must split over ranks x grad_accum_steps and data.readers=4"),
    (["launch.nnodes=2", "train.resume=never"], "a restart after a failure would begin again from step 0"),
    (["launch.nnodes=2", "launch.min_nodes=3"], "launch.min_nodes in .0, nnodes."),
    (["launch.rdzv_endpoint=head"], "'head' is not HOST:PORT"),
    (["launch.collective_timeout_s=0"], "launch.collective_timeout_s must be > 0 seconds"),
])
def test_multi_node_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


def test_one_node_keeps_train_resume_never():
    assert config("train.resume=never", "launch.nproc_per_node=2").train.resume == "never"  # no restarts: fine
