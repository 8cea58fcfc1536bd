"""MoCo v3 (gathered keys), MoCo v2 (shuffling BN + enqueue of gathered keys), Barlow Twins (global
cross-correlation) and BYOL under DDP on 2 real gloo processes equal one process on the
concatenated batch: the loss, every parameter gradient, and for MoCo v2 the queue.

All ranks are spawned once for the module; each runs every case and saves what it saw.
BatchNorm layers whose statistics are per rank on CPU (torch's SyncBatchNorm is GPU-only) are put
in eval mode, except where per-rank statistics are the point: MoCo v2's key encoder, whose BN
groups the single process reproduces with ``shuffle_bn_splits=2`` and the same permutation.
"""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from models.backbones import create_backbone
from models.distributed import batch_shuffle, batch_unshuffle
from models.registry import create_method

WORLD = 2
LOCAL_BATCH = 4
GLOBAL_BATCH = WORLD * LOCAL_BATCH
SHUFFLE_SEED = 123  # seeds the permutation drawn by rank 0 (and by the single process)
CASES = ("moco_v3", "moco_v2", "barlow_twins", "byol")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bn_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def make_model(case: str, shuffle_bn_splits: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    if case == "moco_v2":
        model = create_method("moco_v2", create_backbone("resnet18"), proj_hidden_dim=32, proj_out_dim=16,
                              queue_size=4 * GLOBAL_BATCH, temperature=0.2, shuffle_bn_splits=shuffle_bn_splits)
        model.train()
        bn_eval(model.backbone)  # queries: per-sample; keys: BN in train mode, grouped by shuffle-BN
        return model
    vit = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2)
    args = {
        "moco_v3": dict(proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32, temperature=0.2),
        "barlow_twins": dict(proj_hidden_dim=32, proj_out_dim=16, lambd=0.02),
        "byol": dict(proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32),
    }[case]
    model = create_method(case, vit, **args).train()
    bn_eval(model)
    return model


def make_views(case: str) -> list[torch.Tensor]:
    size = 32 if case == "moco_v2" else 16
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=g) for _ in range(2)]


def run_case(case: str, model: nn.Module, views: list[torch.Tensor]) -> dict:
    """Two training forwards (MoCo v2's second one reads the keys enqueued by the first); the
    gradients of the first, the losses of both."""
    out: dict = {"losses": []}
    for step in range(2):
        torch.manual_seed(SHUFFLE_SEED + step)
        loss = model(views)["loss"]
        loss.backward()
        out["losses"].append(loss.detach().clone())
        if step == 0:
            inner = model.module if isinstance(model, DistributedDataParallel) else model
            out["grads"] = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
            out["no_grad"] = [n for n, p in inner.named_parameters() if not p.requires_grad]
            inner.zero_grad(set_to_none=True)
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if case == "moco_v2":
        out["queue"], out["ptr"] = inner.queue.keys.clone(), inner.queue.ptr.clone()
    return out


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for case in CASES:
        tic = time.perf_counter()
        model = DistributedDataParallel(make_model(case))
        got = run_case(case, model, [v[local] for v in make_views(case)])
        for i, loss in enumerate(got["losses"]):  # the loss of the global batch: mean over ranks
            dist.all_reduce(loss)
            got["losses"][i] = loss / WORLD
        results[case] = got
        print(f"rank {rank} {case}: {time.perf_counter() - tic:.2f}s", flush=True)
    # shuffling BN itself: the ranks' shuffled slices make up the permuted global batch
    x = torch.arange(GLOBAL_BATCH * 2, dtype=torch.float32).view(GLOBAL_BATCH, 2)
    torch.manual_seed(SHUFFLE_SEED)
    shuffled, unshuffle = batch_shuffle(x[local])
    results["shuffle"] = {"shuffled": shuffled, "unshuffled": batch_unshuffle(shuffled, unshuffle)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_methods")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def single_process(case: str, **kwargs) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_case(case, make_model(case, **kwargs), make_views(case))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_on_concatenated_batch(ranks, case):
    # MoCo v2 on one process: 2 BN groups of the shuffled batch, like 2 ranks of 4
    reference = single_process(case, **({"shuffle_bn_splits": 2} if case == "moco_v2" else {}))
    for rank, results in enumerate(ranks):
        got = results[case]
        for step, (loss, ref) in enumerate(zip(got["losses"], reference["losses"])):
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6, msg=f"rank {rank} loss of step {step}")
        assert got["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            # atol scaled to the tensor: gradients that are 0 in exact arithmetic (a bias before a
            # normalisation) are float noise on both sides
            atol = 1e-5 * max(1.0, grad.abs().max().item())
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=atol, msg=f"rank {rank} {name}")
        assert got["no_grad"] == reference["no_grad"]  # targets: frozen, and absent from the gradients
        if case == "moco_v2":
            # keys enqueued in rank order: rank 0's batch, then rank 1's, exactly the single process's
            torch.testing.assert_close(got["queue"], reference["queue"], rtol=1e-5, atol=1e-6)
            assert got["ptr"].item() == reference["ptr"].item() == 2 * GLOBAL_BATCH


@pytest.mark.slow
def test_moco_v2_keys_really_depend_on_the_shuffled_bn_groups(ranks):
    one_group = single_process("moco_v2", shuffle_bn_splits=1)
    assert not torch.allclose(ranks[0]["moco_v2"]["losses"][0], one_group["losses"][0], rtol=1e-4)


@pytest.mark.slow
def test_batch_shuffle_across_ranks(ranks):
    x = torch.arange(GLOBAL_BATCH * 2, dtype=torch.float32).view(GLOBAL_BATCH, 2)
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(GLOBAL_BATCH)  # what rank 0 drew and broadcast
    shuffled = torch.cat([r["shuffle"]["shuffled"] for r in ranks])
    assert torch.equal(shuffled, x[perm])
    for rank, results in enumerate(ranks):
        assert torch.equal(results["shuffle"]["unshuffled"], x[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH])
