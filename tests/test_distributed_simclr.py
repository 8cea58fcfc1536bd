"""Global-batch NT-Xent under DDP (2 real gloo processes) equals one process on the
concatenated batch: the loss and every parameter gradient."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.registry import create_method

WORLD = 2
LOCAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # A ViT (LayerNorm only) keeps every sample independent of the others in the batch, so the
    # only cross-sample interaction is the loss itself. The projector's BatchNorm is put in eval
    # mode for the same reason: CPU DDP has per-rank BN (SyncBatchNorm is GPU-only in torch).
    backbone = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=2)
    model = create_method("simclr", backbone, proj_hidden_dim=32, proj_out_dim=16, temperature=0.3)
    model.train()
    model.projector.eval()
    return model


def make_views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * LOCAL_BATCH, 3, 16, 16, generator=g) for _ in range(2)]


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = DistributedDataParallel(make_model())
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = model([v[local] for v in make_views()])["loss"]
    loss.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
    torch.save({"loss": global_loss / WORLD, "grads": grads}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_concatenated_batch(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    reference = make_model()
    ref_loss = reference(make_views())["loss"]
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
