"""The cross-rank parts of DINO and iBOT / DINOv2-style on 2 real gloo processes against one process on
the concatenated batch: DINO as a whole under DDP (loss, every gradient, and the centre averaged over
the global batch, read back by a second step), Sinkhorn-Knopp over the global batch, and the centre
of rows whose number differs per rank (iBOT's masked patches).

All ranks are spawned once for the module; each runs every case and saves what it saw.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.losses import sinkhorn_knopp
from ssl_foundry.models.methods.dino import TeacherCenter
from ssl_foundry.models.registry import create_method
from test_distributed_methods import free_port

WORLD, LOCAL_BATCH = 2, 4
GLOBAL_BATCH = WORLD * LOCAL_BATCH
ROW_SLICES = (slice(0, 3), slice(3, 8))  # uneven per-rank rows: 3 and 5


def make_dino() -> torch.nn.Module:
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, dynamic_img_size=True)
    return create_method("dino", vit, out_dim=32, hidden_dim=32, bottleneck_dim=16, center_momentum=0.5,
                         teacher_temp=0.05).train()


def make_views() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(GLOBAL_BATCH, 3, size, size, generator=g) for size in (16, 16, 8, 8, 8)]


def run_dino(model, views: list[torch.Tensor]) -> dict:
    """Two forwards (the second's teacher targets use the centre the first updated): the losses of
    both, the gradients of the first, the centre after each."""
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    out = {"losses": [], "centers": []}
    for step in range(2):
        loss = model(views)["loss"]
        loss.backward()
        out["losses"].append(loss.detach().clone())
        out["centers"].append(inner.center.center.clone())
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}
            inner.zero_grad(set_to_none=True)
    return out


def scores() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(2))


def run_center(rows: torch.Tensor) -> torch.Tensor:
    center = TeacherCenter(6, momentum=0.7)
    center.update(rows)
    center.update(2 * rows + 1)
    return center.center


def _rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    got = run_dino(DistributedDataParallel(make_dino()), [v[local] for v in make_views()])
    for loss in got["losses"]:  # the loss of the global batch: mean over ranks
        dist.all_reduce(loss)
        loss /= WORLD
    rows = ROW_SLICES[rank]
    results = {"dino": got, "sinkhorn": sinkhorn_knopp(scores()[rows], epsilon=0.3),
               "center": run_center(scores()[rows])}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_dino")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
def test_dino_on_two_ranks_equals_one_process_on_the_concatenated_batch(ranks, one_thread):
    reference = run_dino(make_dino(), make_views())
    for rank, results in enumerate(ranks):
        got = results["dino"]
        for step in range(2):
            torch.testing.assert_close(got["losses"][step], reference["losses"][step], rtol=1e-5, atol=1e-6)
            # the centre is the EMA of the teacher's mean over all 2 x 8 global views, on every rank
            torch.testing.assert_close(got["centers"][step], reference["centers"][step], rtol=1e-5, atol=1e-7)
        assert got["grads"].keys() == reference["grads"].keys()
        for name, grad in reference["grads"].items():
            atol = 1e-5 * max(1.0, grad.abs().max().item())
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=atol, msg=f"rank {rank} {name}")
    # and the centre really is global: one rank's rows alone give another mean
    alone = run_dino(make_dino(), [v[:LOCAL_BATCH] for v in make_views()])
    assert not torch.allclose(alone["centers"][0], reference["centers"][0], atol=1e-6)


@pytest.mark.slow
def test_sinkhorn_knopp_over_ranks_equals_one_process(ranks):
    reference = sinkhorn_knopp(scores(), epsilon=0.3)
    got = torch.cat([r["sinkhorn"] for r in ranks])
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(sinkhorn_knopp(scores()[ROW_SLICES[0]], epsilon=0.3), reference[ROW_SLICES[0]])


@pytest.mark.slow
def test_centre_of_uneven_rows_is_the_global_mean(ranks):
    reference = run_center(scores())  # one process, all 8 rows: the mean over rows, not over ranks
    for results in ranks:
        torch.testing.assert_close(results["center"], reference, rtol=1e-5, atol=1e-7)
