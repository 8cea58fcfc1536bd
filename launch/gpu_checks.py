"""The items of `foundry check gpu` (the runner, the JSON and the table are in launch/check_gpu.py).

One function per item; each runs in its own process, takes the check's :class:`Context` and returns
its figures with ``checks`` (name -> bool: what must hold for the item to pass) and a one-line
``summary``. Sizes come from a :class:`Scale`: ``ON_GPU`` (the acceptance run, <= 8 minutes on one
GPU) or ``CPU_TWIN`` (``--dry-run``: the same code on DALI's CPU backend, gloo, DeepSpeed's CPU
accelerator and the CPU, at sizes that take seconds).
"""
from __future__ import annotations

import gc
import math
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.photos import write_photo_folder
from ssl_foundry.data_prep.shard_format import ManifestError, read_manifest
from ssl_foundry.launch.bench.loader import truncated_views
from ssl_foundry.launch.isolated_items import Item
from ssl_foundry.launch.local import launch_ranks
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.distributed import zero3_gathered
from ssl_foundry.models.registry import create_method, method_class
from ssl_foundry.pipeline.config import Config, LaunchConfig, TrainConfig, load_config, split_batch
from ssl_foundry.pipeline.data.augment import parity, spec
from ssl_foundry.pipeline.data.dali_acceptance import dali_build
from ssl_foundry.pipeline.data.loader import build_train_loader
from ssl_foundry.pipeline.data.position import LoaderPosition
from ssl_foundry.pipeline.evaluate.knn import extract_features, knn_predict
from ssl_foundry.pipeline.registry.export import export_timm_backbone
from ssl_foundry.pipeline.train.runtime import init_runtime
from ssl_foundry.pipeline.train.strategy import create_strategy
from ssl_foundry.pipeline.train.trainer import build_model, build_scheduler

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) bf16 tensor peak per GPU, TFLOP/s, from the vendors' datasheets. Matched as a
# whole word of torch.cuda.get_device_name() (so "L4" is not "L40S"), the more specific names first.
PEAK_BF16_TFLOPS = (
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0),
    ("H200 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4),
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("A40", 149.7), ("A30", 165.0), ("A10", 125.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("MI325X", 1307.4), ("MI300X", 1307.4), ("MI250X", 383.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name; None for one not in the table."""
    for model, tflops in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(model)}\b", device_name):
            return tflops
    return None


@dataclass(frozen=True)
class Scale:
    """How large every item runs."""

    device: str  # cuda | cpu
    threads: int  # torch threads per process (0: cores / ranks, the trainer's default)
    total_s: float | None  # the whole check's budget
    limits_s: dict[str, float]  # per item
    workers: int  # prep processes, torch loader workers, DALI threads
    fmnist_limit: int | None  # Fashion-MNIST images per split (None: all 70,000)
    photo_copies: int  # each of the 40 package photos written this many times (the DALI item's shards)
    photo_shard_size: int
    loader_batch: int
    loader_batches: int  # timed per backend, after 2 warm-up batches
    stat_batches: int  # per backend and cut of the spec, for the statistics
    cut_after_each_op: bool  # statistics of the spec cut after each op (else of the whole spec only)
    loader_crop: int | None  # the DALI item's views cropped to this size (None: the recipe's 224)
    precision: str  # of the training items
    train_steps: int  # per training item; the first warmup_steps are not timed
    warmup_steps: int
    train_batch: int | None  # None: from the GPU's memory (gpu_train_batch)
    train_overrides: dict[str, list[str]]  # per recipe: the CPU twin's small models
    compile_backend: str
    deepspeed_recipe: str
    deepspeed_overrides: list[str]
    deepspeed_batch: int
    deepspeed_steps: int
    nccl_backbone: dict  # SimCLR ViT (LayerNorm only: per-sample, so ranks == one process)
    nccl_local_batch: int


# Item order: the quick, essential ones first; torch.compile (minutes of compilation) last, so a slow
# compiler can only cut itself short.
ON_GPU_LIMITS_S = {"data": 90, "dali_loader": 90, "train_simclr_resnet50": 60, "train_mae_vit_b16": 60,
                   "nccl_simclr": 60, "deepspeed_zero": 150, "export_knn": 60, "compile_simclr_resnet50": 120,
                   "compile_mae_vit_b16": 120}
_LOADER_WORKERS = 2 ** int(math.log2(min(16, os.cpu_count() or 1)))  # divides the loader batch of 64

ON_GPU = Scale(
    device="cuda", threads=0, total_s=8 * 60, limits_s=ON_GPU_LIMITS_S, workers=_LOADER_WORKERS, fmnist_limit=None,
    photo_copies=48, photo_shard_size=64, loader_batch=64, loader_batches=20, stat_batches=30, cut_after_each_op=True,
    loader_crop=None,
    precision="bf16", train_steps=50, warmup_steps=10, train_batch=None, train_overrides={},
    compile_backend="inductor", deepspeed_recipe="moco_v3_vit_base_imagenet", deepspeed_overrides=[],
    deepspeed_batch=32, deepspeed_steps=20, nccl_backbone={"name": "vit_small_patch16_224", "img_size": 64},
    nccl_local_batch=32)

_TINY_VIT = "model.backbone_args={img_size: 32, patch_size: 8, depth: 2}"


def _views_at(size: int, count: int) -> str:
    return f"data.views=[{{count: {count}, ops: [{{op: random_resized_crop, args: {{size: {size}}}}}]}}]"


CPU_TWIN = Scale(
    # one thread per process: the models are tiny and the machine may be shared
    device="cpu", threads=1, total_s=None, limits_s={}, workers=1, fmnist_limit=256, photo_copies=1,
    photo_shard_size=8, loader_batch=8, loader_batches=3, stat_batches=5, loader_crop=32,
    # the statistics of the whole spec only: each cut builds its own DALI pipeline (seconds of graph tracing
    # on a CPU), and tests/test_dali.py already compares the backends there
    cut_after_each_op=False,
    precision="auto", train_steps=3, warmup_steps=1, train_batch=4,
    train_overrides={
        "simclr_resnet50_imagenet": ["model.backbone=resnet18", _views_at(32, 2),
                                     "model.method_args={proj_hidden_dim: 64, proj_out_dim: 32, temperature: 0.1}"],
        "mae_vit_base_imagenet": ["model.backbone=vit_tiny_patch16_224", _TINY_VIT, _views_at(32, 1),
                                  "model.method_args={decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2}"],
    },
    # inductor's C++ code generation takes minutes on 2 cores; aot_eager traces the same graphs
    # (dynamo + AOTAutograd) and runs them eagerly
    compile_backend="aot_eager", deepspeed_recipe="moco_v3_vit_base_imagenet",
    deepspeed_overrides=["model.backbone=vit_tiny_patch16_224", "model.backbone_args={img_size: 16, patch_size: 8, "
                         "depth: 2}", _views_at(16, 2), "model.method_args={proj_hidden_dim: 32, proj_out_dim: 16, "
                         "pred_hidden_dim: 32, momentum: 0.5, fixed_pos_embed: true, freeze_patch_embed: true}"],
    deepspeed_batch=8, deepspeed_steps=3,
    nccl_backbone={"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "depth": 2}, nccl_local_batch=4)

CPU_TWIN_LIMIT_S = 600  # per item: only a hang is cut short


@dataclass(frozen=True)
class Context:
    """What every item gets: the mode, the output folder, the results of the items before it."""

    dry_run: bool
    out: Path
    peak_tflops: float | None = None  # --peak-tflops: a GPU missing from PEAK_BF16_TFLOPS
    previous: dict[str, dict] = field(default_factory=dict)

    @property
    def scale(self) -> Scale:
        return CPU_TWIN if self.dry_run else ON_GPU

    def limit_s(self, item: str) -> float:
        return self.scale.limits_s.get(item, CPU_TWIN_LIMIT_S)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.dry_run else torch.device("cuda", 0)

    def recipe(self, name: str, overrides: list[str]) -> Config:
        """A recipe of configs/ with ``overrides``, on this check's device and threads."""
        s = self.scale
        return load_config(REPO / "configs" / f"{name}.yaml", [*overrides, f"launch.device={s.device}",
                                                               f"train.threads={s.threads}"], check_paths=False)

    def data(self, key: str) -> str:
        """A shard folder the data item made."""
        data = self.previous.get("data", {})
        if data.get("status") != "passed":
            raise RuntimeError(f"needs the data item's shards, and the data item {data.get('status', 'did not run')}")
        return data[key]


# ------------------------------------------------------------------------------------------ helpers


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _deterministic() -> None:
    """Repeatable kernels for the comparisons: no TF32, deterministic cuDNN and cuBLAS."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory since the last reset; on a CPU, this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_views(cfg: Config, batch: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Normal noise in the shape of the recipe's views, in the memory format the trainer uses."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    return [torch.randn(batch, 3, h, w, generator=g).to(device, memory_format=fmt) for h, w in spec.view_sizes(cfg.data.views)]


def _run_steps(strategy, model: torch.nn.Module, views_of_step: Callable[[int], list[torch.Tensor]], steps: int,
               device: torch.device, scheduler=None) -> tuple[list[float], list[float]]:
    """Optimizer steps as the trainer takes them (one micro-batch each): each step's loss and wall time."""
    losses, times = [], []
    for step in range(steps):
        views = views_of_step(step)
        _synchronize(device)
        tic = time.perf_counter()
        if scheduler is not None:
            scheduler.step_update(step)
        losses.append(float(strategy.forward_backward(views, sync=True)))
        strategy.step()
        model.on_step_end(step + 1, steps)
        _synchronize(device)
        times.append(time.perf_counter() - tic)
    return losses, times


def gpu_train_batch(device: torch.device) -> int:
    """Batch of the training items: 256 on a GPU of 70 GiB or more, 128 from 35 GiB, else 64."""
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return 256 if gib >= 70 else 128 if gib >= 35 else 64


# ------------------------------------------------------------------------------------------ items


def prepare_data(ctx: Context) -> dict:
    """Fashion-MNIST (Debian's dataset-fashion-mnist) and the package photos (scikit-image, opencv-doc)
    as shards: nothing is downloaded. Shard folders completed by an earlier run are reused."""
    s = ctx.scale
    fmnist = ctx.out / "data" / f"fashion-mnist-{s.fmnist_limit or 'all'}"
    # shards of 500: the 10,000 test images make 20, enough for 16 feature-extraction workers
    prep_fashion_mnist(fmnist, shard_size=500, limit=s.fmnist_limit, workers=s.workers)
    photos = ctx.out / "data" / f"photos-x{s.photo_copies}"
    try:
        manifest = read_manifest(photos / "shards")
    except ManifestError:
        write_photo_folder(photos / "images", copies=s.photo_copies)
        prep_images(photos / "images", photos / "shards", shard_size=s.photo_shard_size, workers=s.workers)
        manifest = read_manifest(photos / "shards")
    counts = {split: read_manifest(fmnist / split)["num_samples"] for split in ("train", "test")}
    indexed = sum(int(record["indexed_samples"]) for record in manifest["shards"])
    return {"fashion_mnist": str(fmnist), "fashion_mnist_samples": counts, "photos": str(photos / "shards"),
            "photo_samples": manifest["num_samples"], "photos_indexed": indexed,
            "checks": {"fashion_mnist": min(counts.values()) > 0, "photos_indexed": indexed == manifest["num_samples"]},
            "summary": f"Fashion-MNIST {counts['train']}/{counts['test']}, {manifest['num_samples']} photos"}


def _crop_size(views: list, size: int) -> list:
    """The views with every size-setting op at ``size`` (the CPU twin's small views)."""
    return [replace(v, ops=[replace(op, args={**op.args, "size": size}) if "size" in op.args else op for op in v.ops])
            for v in views]


def _train_loader(cfg: Config, backend: str, device: torch.device):
    return build_train_loader(replace(cfg.data, backend=backend), cfg.train.batch_size,
                              method_class(cfg.model.method).input_kind, cfg.train.seed, 0, 1, LoaderPosition(), device)


def _loader_images_per_s(cfg: Config, backend: str, device: torch.device, batches: int) -> float:
    loader = _train_loader(cfg, backend, device)
    for _ in range(2):  # pipeline build, worker start-up, shuffle buffer fill
        next(loader)
    _synchronize(device)
    tic = time.perf_counter()
    for _ in range(batches):
        next(loader)
    _synchronize(device)
    seconds = time.perf_counter() - tic
    del loader
    _free(device)
    return batches * cfg.train.batch_size / seconds


def _view_statistics(cfg: Config, backend: str, device: torch.device, batches: int):
    """Source keys, and per view its channels' mean and std (N, 3) in grey levels."""
    loader = _train_loader(cfg, backend, device)
    keys, means, stds = [], [], []
    for _ in range(batches):
        batch = next(loader)
        for view in batch["views"]:
            pixels = parity.to_pixels(view.float(), cfg.data.mean, cfg.data.std).flatten(2)
            means.append(pixels.mean(2).cpu())
            stds.append(pixels.std(2).cpu())
            keys += batch["key"]
    del loader
    _free(device)
    return keys, torch.cat(means), torch.cat(stds)


def check_dali_loader(ctx: Context) -> dict:
    """DALI (`mixed` nvJPEG decode + the GPU augmentation graph; the CPU backend in the twin) against the
    torch loader on the same shards and spec (BYOL's views: every op of the spec): images/s of each, and
    for the spec cut after each op, every channel's mean and std of the views paired by photo, within
    the tolerance of the CPU parity tests (pipeline.data.augment.parity)."""
    s = ctx.scale
    cfg = ctx.recipe("byol_resnet50_imagenet", [f"data.train={ctx.data('photos')}", f"data.num_workers={s.workers}",
                                                "data.shuffle_buffer=256", f"train.batch_size={s.loader_batch}",
                                                "train.grad_accum_steps=1"])
    device = init_runtime(cfg.launch, cfg.train).device
    if s.loader_crop:
        cfg = replace(cfg, data=replace(cfg.data, views=_crop_size(cfg.data.views, s.loader_crop)))
    images_per_s = {b: _loader_images_per_s(cfg, b, device, s.loader_batches) for b in ("dali", "torch")}
    per_op = []
    longest = max(len(v.ops) for v in cfg.data.views)
    for k in range(1, longest + 1) if s.cut_after_each_op else [longest]:
        prefix = replace(cfg, data=replace(cfg.data, views=truncated_views(cfg.data.views, k)))
        (d_keys, d_mean, d_std), (t_keys, t_mean, t_std) = (
            _view_statistics(prefix, b, device, s.stat_batches) for b in ("dali", "torch"))
        statistics_ = [{"channel": c, "statistic": name, **parity.paired_comparison(
                            d_keys, d[:, c], t_keys, t[:, c], parity.ROUNDING_ALLOWANCE)}
                       for c in range(3) for name, d, t in (("mean", d_mean, t_mean), ("std", d_std, t_std))]
        last_op = " / ".join(sorted({v.ops[k - 1].op for v in cfg.data.views if len(v.ops) >= k}))
        per_op.append({"ops": k, "through": last_op, "agree": all(x["agree"] for x in statistics_),
                       "statistics": statistics_})
    agreeing = sum(p["agree"] for p in per_op)
    return {"recipe": "byol_resnet50_imagenet", "dali": dali_build(), "decode": "mixed" if device.type == "cuda"
            else "cpu", "batch_size": s.loader_batch, "workers": s.workers, "view_sizes": spec.view_sizes(cfg.data.views),
            "images_per_s": images_per_s, "dali_over_torch": images_per_s["dali"] / images_per_s["torch"],
            "per_op": per_op, "checks": {f"statistics_agree_through_op{p['ops']}_{p['through']}": p["agree"]
                                         for p in per_op},
            "summary": f"DALI {images_per_s['dali']:.0f} img/s, torch {images_per_s['torch']:.0f} img/s; "
                       f"statistics agree at {agreeing}/{len(per_op)} cuts of the spec"}


def _step_flops(strategy, views: list[torch.Tensor]) -> int:
    """FLOPs of one forward + backward (torch's FLOP counter: matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        strategy.forward_backward(views, sync=True)
    strategy.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check_training(ctx: Context, recipe: str, eager_item: str | None = None) -> dict:
    """The recipe's model on one device, bf16 autocast, channels-last where the recipe has it (the
    CNNs), through the DDP strategy's step: images/s, peak memory, FLOPs per step and MFU. With
    ``eager_item`` (the same recipe's item without compilation), the same after ``model.compile()``,
    whose first step includes the compilation."""
    s = ctx.scale
    cfg = ctx.recipe(recipe, [*s.train_overrides.get(recipe, []), f"train.precision={s.precision}",
                              "launch.nproc_per_node=1", "train.grad_accum_steps=1"])
    rt = init_runtime(cfg.launch, cfg.train)
    batch = s.train_batch or gpu_train_batch(rt.device)
    cfg = replace(cfg, train=replace(cfg.train, batch_size=batch))
    torch.manual_seed(0)
    model = build_model(cfg).to(rt.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    strategy = create_strategy(cfg, model, rt, batch)
    views = _synthetic_views(cfg, batch, rt.device)
    flops = _step_flops(strategy, views)
    if eager_item:
        model.compile(backend=s.compile_backend)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    losses, times = _run_steps(strategy, model, lambda step: views, s.train_steps, rt.device)
    step_s = statistics.median(times[s.warmup_steps:])
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"
    peak = ctx.peak_tflops or peak_bf16_tflops(name)
    achieved = flops / step_s / 1e12
    result = {"recipe": recipe, "method": cfg.model.method, "backbone": cfg.model.backbone, "device": name,
              "batch_size": batch, "view_sizes": spec.view_sizes(cfg.data.views), "precision": cfg.train.precision,
              "autocast": str(strategy.amp_dtype or "off").removeprefix("torch."),
              "channels_last": cfg.train.channels_last, "steps": s.train_steps,
              "timed_steps": len(times) - s.warmup_steps,
              "first_step_s": times[0], "step_time_s": step_s, "images_per_s": batch / step_s, "flops_per_step": flops,
              "achieved_tflops": achieved, "peak_bf16_tflops": peak, "mfu": achieved / peak if peak else None,
              "peak_memory_mb": _peak_memory_mb(rt.device), "first_loss": losses[0], "final_loss": losses[-1],
              "checks": {"losses_finite": all(map(math.isfinite, losses))}}
    mfu = f", MFU {100 * result['mfu']:.1f}%" if peak else f" (no bf16 peak known for {name}: --peak-tflops)"
    result["summary"] = f"{batch / step_s:.0f} img/s, {achieved:.3g} TFLOP/s{mfu}, {result['peak_memory_mb']:.0f} MiB"
    if eager_item:
        result["compile_backend"] = s.compile_backend
        eager = ctx.previous.get(eager_item, {})
        if "step_time_s" in eager:
            result["speedup_over_eager"] = eager["step_time_s"] / step_s
            result["summary"] += f"; x{result['speedup_over_eager']:.2f} over eager, first step {times[0]:.0f} s"
    return result


def _nccl_model(backbone: dict) -> torch.nn.Module:
    """SimCLR on a ViT (no batch statistics: each sample's embedding is independent of the others, so
    the only cross-sample term is the loss); the projector's BatchNorm in eval mode for the same reason."""
    torch.manual_seed(0)
    args = dict(backbone)
    model = create_method("simclr", create_backbone(args.pop("name"), **args), proj_hidden_dim=64, proj_out_dim=32,
                          temperature=0.2)
    model.train()
    model.projector.eval()
    return model


def _nccl_views(backbone: dict, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, backbone["img_size"], backbone["img_size"], generator=g) for _ in range(2)]


def nccl_rank(setup: dict) -> dict | None:
    """One rank of the NCCL item (started by torch's elastic launcher, or in the item's process for 1
    rank): DDP over init_runtime's process group, each rank's part of the global batch; returns (rank 0)
    the global loss and the gradients."""
    _deterministic()
    rt = init_runtime(LaunchConfig(device=setup["device"]), TrainConfig(precision="fp32", threads=setup["threads"]))
    if not dist.is_initialized():  # one rank: init_runtime makes no group; the group it would make
        nccl = rt.device.type == "cuda"
        dist.init_process_group("nccl" if nccl else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=rt.device if nccl else None)
    model = _nccl_model(setup["backbone"]).to(rt.device)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                    else None)
    local = slice(rt.rank * setup["local_batch"], (rt.rank + 1) * setup["local_batch"])
    views = [v[local].to(rt.device) for v in _nccl_views(setup["backbone"], setup["local_batch"] * rt.world_size)]
    loss = ddp(views)["loss"]
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    ranks = [torch.zeros(1, device=rt.device) for _ in range(rt.world_size)]
    dist.all_gather(ranks, torch.full((1,), float(rt.rank), device=rt.device))
    result = {"loss": float(total) / rt.world_size, "backend": dist.get_backend(), "world_size": rt.world_size,
              "all_gather": [float(r) for r in ranks],
              "grads": {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}}
    dist.barrier()
    dist.destroy_process_group()
    return result if rt.rank == 0 else None


def check_nccl(ctx: Context) -> dict:
    """A process group over every visible GPU (NCCL; 2 gloo ranks in the twin), started the way
    `foundry pretrain launch.nproc_per_node=N` starts ranks: DDP SimCLR with global-batch negatives
    (each rank's embeddings all-gathered) equals one process on the concatenated batch, the loss and
    every gradient, within the tolerances of tests/test_distributed_simclr.py."""
    s, device = ctx.scale, ctx.device
    ranks = torch.cuda.device_count() if device.type == "cuda" else 2
    setup = {"device": s.device, "threads": s.threads, "backbone": s.nccl_backbone, "local_batch": s.nccl_local_batch}
    tic = time.perf_counter()
    got = launch_ranks(Config(launch=LaunchConfig(nproc_per_node=ranks, device=s.device)), nccl_rank, setup)
    seconds = time.perf_counter() - tic
    _deterministic()
    reference = _nccl_model(s.nccl_backbone).to(device)
    loss = reference([v.to(device) for v in _nccl_views(s.nccl_backbone, s.nccl_local_batch * ranks)])["loss"]
    loss.backward()
    grads = {n: p.grad.cpu() for n, p in reference.named_parameters() if p.grad is not None}
    loss = loss.item()
    loss_ok = math.isclose(got["loss"], loss, rel_tol=1e-5, abs_tol=1e-6)
    grad_excess = max(float(((got["grads"][n] - g).abs() - 1e-6 - 1e-4 * g.abs()).max()) for n, g in grads.items())
    nccl = torch.cuda.nccl.version() if device.type == "cuda" else None
    return {"world_size": got["world_size"], "backend": got["backend"],
            "nccl_version": ".".join(map(str, nccl)) if nccl else None, "global_batch": s.nccl_local_batch * ranks,
            "seconds_launch_and_step": seconds, "loss": got["loss"], "reference_loss": loss,
            "checks": {"all_gather": got["all_gather"] == [float(r) for r in range(ranks)],
                       "loss_equals_one_process": loss_ok, "grads_equal_one_process": grad_excess <= 0
                       and got["grads"].keys() == grads.keys()},
            "summary": f"{got['backend']} x{got['world_size']}: loss {got['loss']:.5f} vs one process {loss:.5f}"}


def _cpu_adam_load() -> dict:
    """Load DeepSpeed's CPU Adam (the op ZeRO-Offload steps with): prebuilt for this accelerator by
    scripts/setup.sh on a CPU machine; JIT-compiled on first use on a GPU one (then cached in
    TORCH_EXTENSIONS_DIR). Timed; a build that fails is reported, not raised."""
    # optional (the [deepspeed] extra); imported in this item's own process, where DS_ACCELERATOR is set
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    accelerator = get_accelerator()._name
    result = {"op": "cpu_adam", "accelerator": accelerator,
              "prebuilt": bool(installed_ops.get("cpu_adam")) and accelerator_name == accelerator}
    tic = time.perf_counter()
    try:
        get_accelerator().create_op_builder("CPUAdamBuilder").load()
    except Exception as err:
        return {**result, "error": f"{type(err).__name__}: {err}"}
    return {**result, "load_s": time.perf_counter() - tic}


def _strategy_run(cfg: Config, steps: int) -> dict:
    """``steps`` steps of the run's strategy on seeded synthetic batches: losses and the final state."""
    rt = init_runtime(cfg.launch, cfg.train)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(rt.device).train()
    initial = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    strategy = create_strategy(cfg, model, rt, split_batch(cfg.train.batch_size, rt.world_size,
                                                           cfg.train.grad_accum_steps))
    scheduler = build_scheduler(cfg, strategy.optimizer, steps)
    losses, times = _run_steps(strategy, model, lambda step: _synthetic_views(cfg, cfg.train.batch_size, rt.device,
                                                                              seed=1000 + step),
                               steps, rt.device, scheduler)
    with zero3_gathered(list(model.parameters())):
        state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    moved = any(not torch.equal(state[f"backbone.{k}"], v.float()) for k, v in initial.items())
    del strategy, model
    _free(rt.device)
    return {"losses": losses, "state": state, "backbone_moved": moved, "step_s": statistics.median(times)}


def _same_training(reference: dict, run: dict) -> dict:
    """tests/test_deepspeed.py's fp32 tolerances: losses within 5e-5 relative, every state tensor
    within 1e-3 relative + 1e-4 absolute."""
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"]))
    excess = {name: float(((run["state"][name] - value).abs() - 1e-4 - 1e-3 * value.abs()).max())
              for name, value in reference["state"].items()}
    worst = max(excess, key=excess.get)
    return {"max_loss_rel_diff": loss_diff, "losses_agree": loss_diff <= 5e-5, "state_agrees": excess[worst] <= 0,
            "worst_state_tensor": worst}


def check_deepspeed(ctx: Context) -> dict:
    """DeepSpeed on the GPU (its CPU accelerator in the twin): CPU Adam's load (JIT build) timed, then
    MoCo v3 ViT trained for the same steps under DDP, ZeRO-2, ZeRO-3 and ZeRO-2 with optimizer offload, fp32
    with deterministic kernels: every ZeRO run's losses and final state equal DDP's within the
    tolerances of tests/test_deepspeed.py."""
    s = ctx.scale
    os.environ["DS_ACCELERATOR"] = s.device
    _deterministic()
    op = _cpu_adam_load()
    common = [*s.deepspeed_overrides, "train.precision=fp32", "launch.nproc_per_node=1",
              "train.optimizer=adamw", "train.lr=1e-3", f"train.lr_batch_ref={s.deepspeed_batch}",
              "train.warmup_steps=2", "train.grad_clip=1.0", f"train.batch_size={s.deepspeed_batch}",
              "train.grad_accum_steps=1"]
    cases = {"ddp": ["train.strategy=ddp"],
             "zero2": ["train.strategy=deepspeed", "deepspeed.zero_stage=2"],
             "zero3": ["train.strategy=deepspeed", "deepspeed.zero_stage=3"],
             "zero2_offload": ["train.strategy=deepspeed", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"]}
    ddp = _strategy_run(ctx.recipe(s.deepspeed_recipe, common + cases.pop("ddp")), s.deepspeed_steps)
    checks = {"ddp_trained": ddp["backbone_moved"], "cpu_adam_loads": "error" not in op}
    compared = {}
    for name, overrides in cases.items():  # one case failing does not cost the others
        if "offload" in name and "error" in op:
            continue
        try:
            run = _strategy_run(ctx.recipe(s.deepspeed_recipe, common + overrides), s.deepspeed_steps)
            compared[name] = {**_same_training(ddp, run), "step_s": run["step_s"], "final_loss": run["losses"][-1]}
        except Exception as err:
            compared[name] = {"error": f"{type(err).__name__}: {err}", "losses_agree": False, "state_agrees": False}
        checks.update({f"{name}_losses_equal_ddp": compared[name]["losses_agree"],
                       f"{name}_state_equals_ddp": compared[name]["state_agrees"]})
    worst = max((c["max_loss_rel_diff"] for c in compared.values() if "error" not in c), default=float("nan"))
    load = f"{op['load_s']:.0f} s ({'prebuilt' if op['prebuilt'] else 'JIT'})" if "load_s" in op else "FAILED"
    return {"recipe": s.deepspeed_recipe, "steps": s.deepspeed_steps, "batch_size": s.deepspeed_batch,
            "cpu_adam": op, "ddp": {"step_s": ddp["step_s"], "final_loss": ddp["losses"][-1]}, "zero": compared,
            "checks": checks,
            "summary": f"CPU Adam load {load}; {', '.join(compared)} vs DDP: worst loss diff {worst:.1e}"}


def check_export_knn(ctx: Context) -> dict:
    """The Fashion-MNIST recipe's backbone exported (timm hub folder), loaded back by plain timm on the
    device: identical features over the test split; then kNN over the whole training bank on the
    device, against the same kNN on the CPU."""
    s = ctx.scale
    fmnist = ctx.data("fashion_mnist")
    cfg = ctx.recipe("simclr_resnet18_fmnist", [f"data.eval_train={fmnist}/train", f"data.eval_test={fmnist}/test"])
    device = init_runtime(cfg.launch, cfg.train).device
    d, m, e = cfg.data, cfg.model, cfg.eval
    _deterministic()
    torch.manual_seed(0)
    backbone = create_backbone(m.backbone, **m.backbone_args).to(device).eval()
    folder = export_timm_backbone(backbone, m.backbone, m.backbone_args, ctx.out / "work" / "export",
                                  (3, d.eval_image_size, d.eval_image_size), tuple(d.mean), tuple(d.std))
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).to(device).eval()
    features = {}
    for name, model in (("exported", backbone), ("plain timm", loaded)):
        features[name] = extract_features(model, d.eval_test, d.eval_image_size, d.mean, d.std, e.batch_size,
                                          s.workers, device)
    tic = time.perf_counter()
    bank, bank_labels = extract_features(loaded, d.eval_train, d.eval_image_size, d.mean, d.std, e.batch_size,
                                         s.workers, device)
    extract_s = time.perf_counter() - tic
    queries, labels = features["plain timm"]
    classes = int(max(bank_labels.max(), labels.max())) + 1
    predicted, knn_s = {}, {}
    for where in dict.fromkeys([device.type, "cpu"]):
        on = torch.device(where, 0) if where == "cuda" else torch.device("cpu")
        _synchronize(on)
        tic = time.perf_counter()
        predicted[where] = knn_predict(bank.to(on), bank_labels.to(on), queries.to(on), classes, e.knn_k,
                                       e.knn_temperature).cpu()
        knn_s[where] = time.perf_counter() - tic
    top1 = float((predicted[device.type] == labels).float().mean())
    agreement = float((predicted[device.type] == predicted["cpu"]).float().mean())
    identical = torch.equal(features["exported"][0], features["plain timm"][0])
    return {"backbone": m.backbone, "image_size": d.eval_image_size, "bank": len(bank), "queries": len(queries),
            "k": e.knn_k, "extract_bank_s": extract_s, "knn_s": knn_s, "knn_top1": top1,
            "prediction_agreement_with_cpu": agreement,
            # a prediction can flip between devices only on a near tie of similarities at the k-th neighbour
            "checks": {"plain_timm_features_identical": identical, "knn_matches_cpu": agreement >= 0.999,
                       "knn_above_chance": top1 > 2 / classes},
            "summary": f"features identical: {identical}; kNN top-1 {100 * top1:.1f}% on {len(bank)} in "
                       f"{knn_s[device.type]:.2f} s ({device.type}), agreement with CPU {100 * agreement:.2f}%"}


ITEMS = (
    Item("data", prepare_data),
    Item("dali_loader", check_dali_loader),
    Item("train_simclr_resnet50", check_training, {"recipe": "simclr_resnet50_imagenet"}),
    Item("train_mae_vit_b16", check_training, {"recipe": "mae_vit_base_imagenet"}),
    Item("nccl_simclr", check_nccl),
    Item("deepspeed_zero", check_deepspeed),
    Item("export_knn", check_export_knn),
    Item("compile_simclr_resnet50", check_training,
         {"recipe": "simclr_resnet50_imagenet", "eager_item": "train_simclr_resnet50"}),
    Item("compile_mae_vit_b16", check_training, {"recipe": "mae_vit_base_imagenet", "eager_item": "train_mae_vit_b16"}),
)
