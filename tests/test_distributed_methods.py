"""MoCo v3 (gathered keys), MoCo v2 (shuffling BN + enqueue of gathered keys), Barlow Twins (global
cross-correlation), BYOL, SwAV (Sinkhorn-Knopp over the global batch and its queue, multi-crop),
VICReg (variance and covariance over the global batch), NNCLR (support set of gathered embeddings,
predictions gathered with gradients) and colorization (ab counts summed over ranks) under DDP on 2
real gloo processes equal one process on the concatenated batch: the loss, every parameter
gradient, and the queues and counts.

All ranks are spawned once for the module; each runs every case and saves what it saw.
The heads' BatchNorm layers train with global-batch statistics on the ranks
(``convert_to_global_batchnorm``, what ``train.global_batchnorm`` does), against plain BN in
train mode on the single process; GlobalBatchNorm itself is also checked alone, with uneven
local batches. MoCo v2 keeps per-rank BN on purpose (shuffling BN): its key encoder's BN groups
are reproduced on one process with ``shuffle_bn_splits=2`` and the same permutation.
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

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.distributed import GlobalBatchNorm, batch_shuffle, batch_unshuffle, convert_to_global_batchnorm
from ssl_foundry.models.registry import create_method

WORLD = 2
LOCAL_BATCH = 4
GLOBAL_BATCH = WORLD * LOCAL_BATCH
SHUFFLE_SEED = 123  # seeds the permutation drawn by rank 0 (and by the single process)
CASES = ("moco_v3", "moco_v2", "barlow_twins", "byol", "swav", "vicreg", "nnclr", "colorization")


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
    if case == "colorization":
        return create_method(case, create_backbone("resnet10t"), decoder_min_dim=16).train()
    vit = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2, dynamic_img_size=True)
    args = {
        "moco_v3": dict(proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32, temperature=0.2),
        "barlow_twins": dict(proj_hidden_dim=32, proj_out_dim=16, lambd=0.02),
        "byol": dict(proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32),
        # the first forward fills the queue, the second solves Sinkhorn-Knopp with it
        "swav": dict(proj_hidden_dim=32, proj_out_dim=16, num_prototypes=10, queue_size=GLOBAL_BATCH,
                     freeze_prototypes_steps=0),
        "vicreg": dict(proj_hidden_dim=32, proj_out_dim=16),
        "nnclr": dict(proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32, queue_size=4 * GLOBAL_BATCH),
    }[case]
    return create_method(case, vit, **args).train()


VIEW_SIZES = {"moco_v2": (32, 32), "swav": (16, 16, 8, 8), "colorization": (32,)}  # SwAV: multi-crop


def make_views(case: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=g) for size in VIEW_SIZES.get(case, (16, 16))]


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
    out["buffers"] = {name: buffer.clone() for name, buffer in inner.named_buffers()
                      if name.split(".")[0] in ("queue", "queues", "support_set", "bin_counts")}
    return out


BN_SLICES = (slice(0, 3), slice(3, 8))  # uneven local batches: 3 and 5 samples


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():  # non-trivial affine parameters
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.train()


def bn_input() -> torch.Tensor:
    return 3 * torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(2)) + 1


def run_batchnorm(net: nn.Module, x: torch.Tensor) -> dict:
    """Output, input gradient, parameter gradients (summed over ranks) and running statistics of
    ``loss = sum(y * w) / global batch``, w fixed per sample: the single process's loss."""
    x = x.clone().requires_grad_(True)
    for _ in range(2):  # two steps: the running statistics' momentum is applied twice
        net.zero_grad(set_to_none=True)
        y = net(x)
        w = torch.linspace(-1, 1, y[0].numel()).view_as(y[0])
        loss = (y * w).sum() / 8
        x.grad = None
        loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    if dist.is_initialized():
        for g in grads.values():
            dist.all_reduce(g)
    return {"y": y.detach(), "x_grad": x.grad.clone(), "grads": grads,
            "buffers": {n: b.clone() for n, b in net.named_buffers()}}


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for case in CASES:
        tic = time.perf_counter()
        model = make_model(case)
        if case != "moco_v2":
            convert_to_global_batchnorm(model)
        model = DistributedDataParallel(model)
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
    net = convert_to_global_batchnorm(bn_net())
    assert isinstance(net[1], GlobalBatchNorm) and isinstance(net[4], GlobalBatchNorm)
    results["global_bn"] = run_batchnorm(net, bn_input()[BN_SLICES[rank]])
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
        # queues: embeddings enqueued in rank order (rank 0's batch, then rank 1's), exactly the single
        # process's; colorization's float64 ab counts: every rank's pixels, on every rank
        assert got["buffers"].keys() == reference["buffers"].keys()
        for name, buffer in reference["buffers"].items():
            assert got["buffers"][name].dtype == buffer.dtype
            torch.testing.assert_close(got["buffers"][name], buffer, rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    if case in ("moco_v2", "swav", "nnclr", "colorization"):
        assert reference["buffers"]  # the comparison above was not empty


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


@pytest.mark.slow
def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(ranks):
    reference = run_batchnorm(bn_net(), bn_input())
    for rank, results in enumerate(ranks):
        got, local = results["global_bn"], BN_SLICES[rank]
        torch.testing.assert_close(got["y"], reference["y"][local], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["x_grad"], reference["x_grad"][local], rtol=1e-4, atol=1e-6)
        for name, grad in reference["grads"].items():  # a conv bias before BN: 0 up to float noise
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-5, msg=f"rank {rank} {name}")
        for name, buffer in reference["buffers"].items():  # running mean/var (unbiased), batches tracked
            torch.testing.assert_close(got["buffers"][name], buffer, rtol=1e-5, atol=1e-6, msg=name)
    # and the statistics really are global: per-rank BN gives other outputs
    per_rank = run_batchnorm(bn_net(), bn_input()[BN_SLICES[0]])
    assert not torch.allclose(per_rank["y"], reference["y"][BN_SLICES[0]], atol=1e-3)
