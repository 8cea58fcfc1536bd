"""Run by ``torchrun --nproc-per-node 2`` from tests/test_deepspeed.py: every method of
``METHOD_ARGS`` trained for a few steps under each strategy case on the same data and seeds; rank 0
saves, per case, the per-step losses and grad norms, the initial and the final full state of the
method (ZeRO-3 shards gathered), for the test to compare against the DDP case.

Usage: strategy_equivalence_worker.py OUT.pt CASE [CASE ...] where CASE is
``method:strategy[:override,override...]``, e.g. ``byol:deepspeed:deepspeed.zero_stage=3``.
"""
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from conftest import IMAGE_SIZE, VIT_ARGS, tiny_recipe

from ssl_foundry.models.distributed import all_reduce_mean, zero3_gathered
from ssl_foundry.models.registry import method_class, takes_teacher
from ssl_foundry.pipeline.config import Config, load_config
from ssl_foundry.pipeline.train.runtime import init_runtime
from ssl_foundry.pipeline.train.strategy import create_strategy
from ssl_foundry.pipeline.train.trainer import build_model, build_scheduler

STEPS = 3
# ZeRO-3 swaps torch.nn.functional.linear for its memory-efficient version process-wide ("this will persist
# unless manually reset", DeepSpeed says): every case starts from the original, so no case inherits it from
# an earlier ZeRO-3 case (a DDP reference would otherwise be compared with another linear's rounding).
TORCH_LINEAR = torch.nn.functional.linear
GLOBAL_BATCH, GRAD_ACCUM = 16, 2  # 2 micro-batches of 4 samples per rank and step

METHOD_ARGS = {  # tiny heads; momentum 0.5 so the targets move visibly in 3 steps
    "simclr": {"proj_hidden_dim": 32, "proj_out_dim": 16, "temperature": 0.2},
    "moco_v2": {"proj_hidden_dim": 32, "proj_out_dim": 16, "queue_size": 16, "momentum": 0.5},
    "moco_v3": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32, "momentum": 0.5},
    "byol": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32, "momentum": 0.5},
    "barlow_twins": {"proj_hidden_dim": 32, "proj_out_dim": 16, "lambd": 0.02},
    "mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
    # a method that takes labels (uses_labels): the strategies pass them through; the other pretext
    # methods are single-view modules with no cross-rank state, the same path as this one
    "s4l": {"num_classes": 10},
    # video methods (input_kind "clip"): clips of CLIP_FRAMES frames; 4 patches a frame, so VideoMAE keeps 1
    "tcn": {"proj_hidden_dim": 32, "embed_dim": 16},
    "shuffle_and_learn": {"classifier_hidden_dim": 32, "positive_fraction": 0.5},
    "cpc": {"embed_dim": 16, "context_dim": 16, "prediction_steps": 2},
    "video_mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "mask_ratio": 0.75},
    # 4 samples per forward: SwAV's prototypes frozen in step 1, its queue filled in step 2 and used
    # in step 3, renormalised after every step (the fp32 master copies of ZeRO too)
    "swav": {"proj_hidden_dim": 32, "proj_out_dim": 16, "num_prototypes": 10, "queue_size": 8, "queue_start_step": 1,
             "freeze_prototypes_steps": 1},
    "vicreg": {"proj_hidden_dim": 32, "proj_out_dim": 16},
    "simsiam": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 8},  # a fixed-lr predictor group
    "nnclr": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32, "queue_size": 16},
    "distill": {"loss": "smooth_l1"},  # from TEACHER (64 features) into the ViT-Tiny student (192)
    # multi-crop (2 global views, LOCAL_VIEWS local ones at LOCAL_SIZE); the last layer frozen for step 1,
    # the weight decay on its cosine (train.weight_decay_end), the teacher temperature warming up
    "dino": {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "momentum": 0.5, "freeze_last_layer_steps": 1,
             "teacher_temp": 0.07, "warmup_teacher_temp_steps": 2},
    # every masked patch in 2 x 2 grids: blocks of one patch; KoLeo and Sinkhorn-Knopp on
    "ibot": {"out_dim": 32, "patch_out_dim": 16, "separate_head": True, "hidden_dim": 32, "bottleneck_dim": 16,
             "momentum": 0.5, "freeze_last_layer_steps": 1, "mask_min_patches": 1, "koleo_weight": 0.1,
             "centering": "sinkhorn_knopp"},
}
# Over the 2 samples a rank has per forward, BatchNorm maps every unit to +-1: NNCLR's embeddings become
# sign vectors whose nearest neighbours in the support set tie exactly (and flip with rounding), and
# VICReg's gradient norm reaches thousands by step 3, which amplifies the reduction-order rounding past
# the tolerances. Global BN (over 4 samples) avoids both; it is itself compared with DDP under ZeRO-3.
TRAIN_OVERRIDES = {"nnclr": {"global_batchnorm": True}, "vicreg": {"global_batchnorm": True}}
TEACHER = {"backbone": "vit_tiny_patch16_224", "backbone_args": {**VIT_ARGS, "embed_dim": 64, "num_heads": 2}}
CLIP_FRAMES = 4
LOCAL_VIEWS, LOCAL_SIZE = 2, IMAGE_SIZE // 2


def is_multi_crop(method: str) -> bool:
    return getattr(method_class(method), "multi_crop", False)


def case_config(method: str, strategy: str, overrides: list[str]) -> Config:
    tree = tiny_recipe(Path("unused"), Path("unused"))
    tree["model"] = {"method": method, "backbone": "vit_tiny_patch16_224", "backbone_args": dict(VIT_ARGS),
                     "method_args": METHOD_ARGS[method]}
    tree["train"].update(strategy=strategy, optimizer="adamw", lr=1e-3, batch_size=GLOBAL_BATCH,
                         grad_accum_steps=GRAD_ACCUM, warmup_steps=1, max_steps=STEPS, grad_clip=1.0,
                         **TRAIN_OVERRIDES.get(method, {}))
    tree["data"]["views"][0]["count"] = method_class(method).num_views
    if takes_teacher(method):
        tree["model"]["teacher"] = str(teacher_export(Path(tempfile.gettempdir()), tree["data"]["mean"],
                                                      tree["data"]["std"]))
    if is_multi_crop(method):
        tree["model"]["backbone_args"]["dynamic_img_size"] = True
        tree["train"].update(weight_decay=0.04, weight_decay_end=0.4)
        tree["data"]["views"].append({"count": LOCAL_VIEWS, "ops": [{"op": "resize", "args": {"size": LOCAL_SIZE}}]})
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tree))
        return load_config(recipe, overrides, check_paths=False)


def teacher_export(folder: Path, mean: list[float], std: list[float]) -> Path:
    """A tiny ViT (seeded: the same on every rank) exported as the distillation teacher."""
    from ssl_foundry.models.backbones import create_backbone
    from ssl_foundry.pipeline.registry.export import export_timm_backbone

    torch.manual_seed(7)
    net = create_backbone(TEACHER["backbone"], **TEACHER["backbone_args"])
    return export_timm_backbone(net, TEACHER["backbone"], TEACHER["backbone_args"], folder / f"teacher-{os.getpid()}",
                                (3, IMAGE_SIZE, IMAGE_SIZE), mean, std)


def micro_batch(step: int, micro: int, rank: int, world: int, num_views: int,
                clips: bool = False, local_views: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This rank's part of micro-batch ``micro`` of the global batch of ``step`` (same on any
    strategy): views and labels (-1: unlabelled, as outside data.labelled_fraction); ``clips``:
    (B, CLIP_FRAMES, 3, H, W) clips for the video methods instead of (B, 3, H, W) images;
    ``local_views`` multi-crop views of LOCAL_SIZE after the ``num_views`` ones."""
    g = torch.Generator().manual_seed(1000 + step)
    shape = (GLOBAL_BATCH, *((CLIP_FRAMES,) if clips else ()), 3, IMAGE_SIZE, IMAGE_SIZE)
    views = [torch.randn(*shape, generator=g) for _ in range(num_views)]
    views += [torch.randn(GLOBAL_BATCH, 3, LOCAL_SIZE, LOCAL_SIZE, generator=g) for _ in range(local_views)]
    labels = torch.randint(-1, 10, (GLOBAL_BATCH,), generator=g)
    per_micro, per_rank = GLOBAL_BATCH // GRAD_ACCUM, GLOBAL_BATCH // GRAD_ACCUM // world
    start = micro * per_micro + rank * per_rank
    return [v[start:start + per_rank] for v in views], labels[start:start + per_rank]


def run_case(method: str, strategy_name: str, overrides: list[str]) -> dict:
    torch.nn.functional.linear = TORCH_LINEAR
    cfg = case_config(method, strategy_name, overrides)
    rt = init_runtime(cfg.launch, cfg.train)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(rt.device).train()
    initial = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    strategy = create_strategy(cfg, model, rt)
    scheduler = build_scheduler(cfg, strategy.optimizer, STEPS)
    num_views = method_class(method).num_views
    uses_labels = getattr(method_class(method), "uses_labels", False)
    clips = getattr(method_class(method), "input_kind", "image") == "clip"
    losses, grad_norms = [], []
    for step in range(STEPS):
        scheduler.step_update(step)
        step_loss = torch.zeros(())
        for micro in range(GRAD_ACCUM):
            torch.manual_seed(10 * step + micro + 100 * rt.rank)  # MAE's masks, MoCo v2's shuffle, frame sampling
            views, labels = micro_batch(step, micro, rt.rank, rt.world_size, num_views, clips,
                                        LOCAL_VIEWS if is_multi_crop(method) else 0)
            loss = strategy.forward_backward(views, sync=micro == GRAD_ACCUM - 1,
                                             labels=labels if uses_labels else None)
            step_loss += loss / GRAD_ACCUM
        losses.append(float(all_reduce_mean(step_loss)))
        grad_norms.append(strategy.step())
        if hasattr(model, "on_step_end"):
            model.on_step_end(step + 1, STEPS)
    with zero3_gathered(list(model.parameters())):
        state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    return {"losses": losses, "grad_norms": grad_norms, "state": state, "initial": initial}


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    results = {}
    for case in cases:
        method, strategy_name, *rest = case.split(":")
        results[case] = run_case(method, strategy_name, rest[0].split(",") if rest and rest[0] else [])
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
