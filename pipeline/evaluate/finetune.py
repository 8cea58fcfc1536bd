"""Full fine-tuning of a pretrained backbone with a new linear classifier: the end-to-end
protocol of MAE (He et al. 2021, appendix A.1) and BEiT (Bao et al. 2021), on any timm backbone.

Every parameter trains. The recipe knobs are the usual ones: AdamW (or SGD / LARS) with the lr
scaled linearly with the global batch; layer-wise lr decay (the lr of a layer group is multiplied
by ``layer_decay ** (its depth counted from the head)``; timm's ``param_groups_layer_decay``,
through ``create_optimizer_v2(layer_decay=...)``); linear warmup then cosine decay per step;
label smoothing; optional mixup / cutmix (``timm.data.Mixup``, soft targets). Training images are
data.eval_train through random_resized_crop + horizontal flip at data.eval_image_size; top-1 is
measured on data.eval_test with the eval transform.

It runs like pretraining: one process, or one rank per device under torchrun / the elastic
launcher (DDP over gloo on CPUs, NCCL on GPUs; ``pipeline.train.runtime``). Each rank reads its own
shards of the global batch; rank 0 evaluates, logs the MLflow run and exports the classifier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.nn.parallel import DistributedDataParallel

from ssl_foundry.data_prep.console import Progress
from ssl_foundry.data_prep.shard_format import redact
from ssl_foundry.pipeline.config import Config, split_batch
from ssl_foundry.pipeline.data.augment.spec import AugmentOp, ViewSpec
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform, eval_transform
from ssl_foundry.pipeline.data.loader import ShardStream, make_loader
from ssl_foundry.pipeline.registry.export import BackboneSource, export_timm_backbone, load_timm_backbone
from ssl_foundry.pipeline.train.runtime import Runtime, autocast, autocast_dtype, start_collective_timeout


@dataclass
class FinetuneResult:
    top1: float  # on data.eval_test
    losses: list[tuple[int, float, float]]  # (step, loss, lr) every eval.finetune.log_every steps
    model: torch.nn.Module  # the fine-tuned classifier (rank 0's copy, unwrapped, eval mode)
    num_classes: int


def train_views(cfg: Config) -> list[ViewSpec]:
    """The fine-tuning augmentation: a random crop of crop_scale of the area, and a flip."""
    size = cfg.data.eval_image_size
    return [ViewSpec(count=1, ops=[
        AugmentOp(op="random_resized_crop", args={"size": size, "scale": list(cfg.eval.finetune.crop_scale)}),
        AugmentOp(op="horizontal_flip", p=0.5)])]


def build_classifier(source: BackboneSource, num_classes: int) -> torch.nn.Module:
    """The exported backbone (plain timm) with a new, zero-initialised linear classifier."""
    model = load_timm_backbone(source.folder)
    model.reset_classifier(num_classes)
    head = model.get_classifier()
    torch.nn.init.zeros_(head.weight)  # every class starts equal (MAE initialises the head ~0)
    torch.nn.init.zeros_(head.bias)
    return model


def build_finetune_optimizer(model: torch.nn.Module, cfg: Config):
    """AdamW / SGD / LARS with the linearly scaled lr, no weight decay on biases and norms, and
    layer-wise lr decay (per-group ``lr_scale``, which timm's scheduler applies)."""
    ft = cfg.eval.finetune
    return create_optimizer_v2(model, opt=ft.optimizer, lr=ft.lr * ft.batch_size / 256,
                               weight_decay=ft.weight_decay,
                               layer_decay=ft.layer_decay if ft.layer_decay < 1 else None)


@torch.no_grad()
def top1_accuracy(model: torch.nn.Module, cfg: Config, device: torch.device) -> float:
    d = cfg.data
    stream = ShardStream(d.eval_test, eval_transform(d.eval_image_size, d.mean, d.std), cfg.eval.batch_size,
                         num_workers=d.num_workers, finite=True)
    model.eval()
    correct = total = 0
    with Progress(total=stream.num_samples, desc=f"top-1 on {redact(d.eval_test)}", unit="img") as progress:
        for batch in make_loader(stream):
            logits = model(batch["views"][0].to(device))
            correct += int((logits.argmax(dim=1).cpu() == batch["label"]).sum())
            total += len(batch["label"])
            progress.update(len(batch["label"]))
    return correct / total


def finetune(source: BackboneSource, cfg: Config, rt: Runtime, num_classes: int) -> FinetuneResult | None:
    """Fine-tune on this rank; rank 0 returns the result (the others None). The caller has checked
    that the backbone takes data.eval_image_size px images (``pipeline.registry.export.check_input_size``) and
    the eval.finetune.* rules for this world size (``pipeline.config.validate_finetune``)."""
    ft, d = cfg.eval.finetune, cfg.data
    local_batch = split_batch(ft.batch_size, rt.world_size, readers=0, num_workers=d.num_workers,
                              batch_key="eval.finetune.batch_size")
    torch.manual_seed(cfg.train.seed)  # the same head on every rank (DDP also broadcasts rank 0's)
    model = build_classifier(source, num_classes).to(rt.device)
    optimizer = build_finetune_optimizer(model, cfg)
    scheduler = CosineLRScheduler(optimizer, t_initial=ft.steps, lr_min=0.0, warmup_t=ft.warmup_steps,
                                  warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    mixup = (Mixup(mixup_alpha=ft.mixup_alpha, cutmix_alpha=ft.cutmix_alpha, label_smoothing=ft.label_smoothing,
                   num_classes=num_classes) if ft.mixup_alpha or ft.cutmix_alpha else None)
    trained = (DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
               if rt.world_size > 1 else model)
    stream = ShardStream(d.eval_train, MultiViewTransform(train_views(cfg), d.mean, d.std), local_batch,
                         rank=rt.rank, world_size=rt.world_size, num_workers=d.num_workers,
                         seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer)
    amp = autocast_dtype(cfg.train, rt.device)
    torch.manual_seed(cfg.train.seed + rt.rank)  # mixup's draws: independent per rank
    start_collective_timeout(cfg.launch)
    trained.train()
    losses = []
    steps = Progress(range(1, ft.steps + 1), desc="fine-tune", unit="step")
    for step, batch in zip(steps, make_loader(stream)):
        images, labels = batch["views"][0].to(rt.device), batch["label"].to(rt.device)
        if mixup is not None:
            images, targets = mixup(images, labels)
        with autocast(rt.device, amp):
            logits = trained(images)
        if mixup is not None:
            loss = SoftTargetCrossEntropy()(logits.float(), targets)
        else:
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=ft.label_smoothing)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}: lower eval.finetune.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step)
        if step % ft.log_every == 0 or step == ft.steps:
            mean_loss = loss.detach()
            if rt.world_size > 1:
                dist.all_reduce(mean_loss)
                mean_loss /= rt.world_size
            losses.append((step, float(mean_loss), optimizer.param_groups[-1]["lr"]))
            steps.set_postfix(loss=f"{losses[-1][1]:.4f}", refresh=False)
    if not rt.is_main:
        return None
    return FinetuneResult(top1=top1_accuracy(model, cfg, rt.device), losses=losses, model=model.eval(),
                          num_classes=num_classes)


def export_classifier(result: FinetuneResult, source: BackboneSource, cfg: Config, out_dir: str):
    """The fine-tuned classifier as a timm hub folder in ``out_dir`` (``num_classes`` outputs), with
    the backbone's own architecture and model_args, and the fine-tuning's preprocessing."""
    config = source.config
    d = cfg.data
    return export_timm_backbone(result.model, config["architecture"], config.get("model_args", {}),
                                out_dir,
                                input_size=(3, d.eval_image_size, d.eval_image_size), mean=tuple(d.mean),
                                std=tuple(d.std), num_classes=result.num_classes,
                                extra={"finetuned_from": source.ref, **config.get("ssl_foundry", {})})
