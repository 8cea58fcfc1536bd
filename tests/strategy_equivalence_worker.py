"""Run by ``torchrun --nproc-per-node 2`` from tests/test_deepspeed.py: every method of
``METHOD_ARGS`` trained for a few steps under each strategy case on the same data and seeds; rank 0
saves, per case, the per-step losses and grad norms, the initial and the final full state of the
method (ZeRO-3 shards gathered), for the test to compare against the DDP case.

Usage: strategy_equivalence_worker.py OUT.pt CASE [CASE ...] where CASE is
``method:strategy[:override,override...]``, e.g. ``byol:deepspeed:deepspeed.zero_stage=3``.
"""
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from conftest import IMAGE_SIZE, VIT_ARGS, tiny_recipe

from ssl_foundry.models.distributed import all_reduce_mean, zero3_gathered
from ssl_foundry.models.registry import method_class
from ssl_foundry.pipeline.config import Config, load_config, split_batch
from ssl_foundry.pipeline.train.runtime import init_runtime
from ssl_foundry.pipeline.train.strategy import create_strategy
from ssl_foundry.pipeline.train.trainer import build_model, build_scheduler

STEPS = 3
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
}
CLIP_FRAMES = 4


def case_config(method: str, strategy: str, overrides: list[str]) -> Config:
    tree = tiny_recipe(Path("unused"), Path("unused"))
    tree["model"] = {"method": method, "backbone": "vit_tiny_patch16_224", "backbone_args": dict(VIT_ARGS),
                     "method_args": METHOD_ARGS[method]}
    tree["train"].update(strategy=strategy, optimizer="adamw", lr=1e-3, batch_size=GLOBAL_BATCH,
                         grad_accum_steps=GRAD_ACCUM, warmup_steps=1, max_steps=STEPS, grad_clip=1.0)
    tree["data"]["views"][0]["count"] = method_class(method).num_views
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tree))
        return load_config(recipe, overrides, check_paths=False)


def micro_batch(step: int, micro: int, rank: int, world: int, num_views: int,
                clips: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """This rank's part of micro-batch ``micro`` of the global batch of ``step`` (same on any
    strategy): views and labels (-1: unlabelled, as outside data.labelled_fraction); ``clips``:
    (B, CLIP_FRAMES, 3, H, W) clips for the video methods instead of (B, 3, H, W) images."""
    g = torch.Generator().manual_seed(1000 + step)
    shape = (GLOBAL_BATCH, *((CLIP_FRAMES,) if clips else ()), 3, IMAGE_SIZE, IMAGE_SIZE)
    views = [torch.randn(*shape, generator=g) for _ in range(num_views)]
    labels = torch.randint(-1, 10, (GLOBAL_BATCH,), generator=g)
    per_micro, per_rank = GLOBAL_BATCH // GRAD_ACCUM, GLOBAL_BATCH // GRAD_ACCUM // world
    start = micro * per_micro + rank * per_rank
    return [v[start:start + per_rank] for v in views], labels[start:start + per_rank]


def run_case(method: str, strategy_name: str, overrides: list[str]) -> dict:
    cfg = case_config(method, strategy_name, overrides)
    rt = init_runtime(cfg.launch, cfg.train)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg).to(rt.device).train()
    initial = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    strategy = create_strategy(cfg, model, rt, split_batch(GLOBAL_BATCH, rt.world_size, GRAD_ACCUM))
    scheduler = build_scheduler(cfg, strategy.optimizer, STEPS)
    clips = model.input_kind == "clip"
    losses, grad_norms = [], []
    for step in range(STEPS):
        scheduler.step_update(step)
        step_loss = torch.zeros(())
        for micro in range(GRAD_ACCUM):
            torch.manual_seed(10 * step + micro + 100 * rt.rank)  # MAE's masks, MoCo v2's shuffle, frame sampling
            views, labels = micro_batch(step, micro, rt.rank, rt.world_size, model.num_views, clips)
            loss = strategy.forward_backward(views, sync=micro == GRAD_ACCUM - 1,
                                             labels=labels if model.uses_labels else None)
            step_loss += loss / GRAD_ACCUM
        losses.append(float(all_reduce_mean(step_loss)))
        grad_norms.append(strategy.step())
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
