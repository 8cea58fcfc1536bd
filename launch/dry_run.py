"""`foundry pretrain CFG --dry-run`: what the run would do, decided exactly as the run decides it
(the same functions), without starting ranks, loaders or MLflow."""
from __future__ import annotations

import os

import torch

from ssl_foundry.data_prep.shard_format import read_manifest, redact
from ssl_foundry.launch.local import under_launcher
from ssl_foundry.pipeline.config import Config, split_batch, uses_cuda
from ssl_foundry.pipeline.data.loader import train_backend
from ssl_foundry.pipeline.registry.tracking import resolve_tracking_uri
from ssl_foundry.pipeline.train.checkpoint import checkpoint_step
from ssl_foundry.pipeline.train.optim import base_lr
from ssl_foundry.pipeline.train.run_dir import plan_run
from ssl_foundry.pipeline.train.runtime import autocast_dtype, cpu_has_fast_bf16


def dry_run_report(cfg: Config) -> list[str]:
    """``label: value`` lines: output_dir and what happens to it, ranks, batch split, steps, the
    scaled lr, the data, loader, device, precision, strategy, evaluation and MLflow store."""
    t, d, launch = cfg.train, cfg.data, cfg.launch
    ranks = (int(os.environ["WORLD_SIZE"]), "from the launcher") if under_launcher() else (
        launch.nproc_per_node * launch.nnodes, f"launch.nproc_per_node={launch.nproc_per_node} x "
                                               f"launch.nnodes={launch.nnodes}")
    per_rank = split_batch(t.batch_size, ranks[0], t.grad_accum_steps)
    device = torch.device("cuda" if uses_cuda(launch) else "cpu")
    dist_backend = launch.backend if launch.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    loader, why = train_backend(d.backend, device, d.train)
    amp = autocast_dtype(t, device)
    manifest = read_manifest(d.train)
    samples = int(manifest["num_samples"])
    plan = plan_run(cfg)
    start = plan.describe()
    if plan.checkpoint is not None and checkpoint_step(plan.checkpoint) >= t.max_steps:
        start += f": already at train.max_steps={t.max_steps}, nothing to train (raise it to train on)"
    scaled = f"{base_lr(cfg):.6g} = train.lr {t.lr:g} x batch {t.batch_size} / train.lr_batch_ref {t.lr_batch_ref}"
    steps = f"{t.max_steps} (warmup {t.warmup_steps}, cosine to min_lr {t.min_lr:g})"
    if t.budget_minutes > 0:
        steps += f", fewer if {t.budget_minutes:g} min of training cannot fit them (train.budget_minutes)"
    evaluation = "none after pretraining"
    if cfg.eval.after_pretrain and d.eval_train and d.eval_test:
        evaluation = (f"kNN (k={cfg.eval.knn_k}) after pretraining: bank {redact(d.eval_train)}, "
                      f"queries {redact(d.eval_test)}")
    if cfg.eval.knn_every:
        evaluation += f"; online kNN every {cfg.eval.knn_every} steps"
    strategy = t.strategy + (f" (ZeRO stage {cfg.deepspeed.zero_stage})" if t.strategy == "deepspeed" else "")
    return [
        f"output_dir:  {cfg.output_dir}: {start}",
        f"method:      {cfg.model.method} on {cfg.model.backbone}",
        f"ranks:       {ranks[0]} ({ranks[1]}) on {device.type}, process group {dist_backend}, strategy {strategy}",
        f"batch:       {t.batch_size} global = {ranks[0]} rank(s) x {per_rank} per rank x "
        f"{t.grad_accum_steps} accumulation step(s)",
        f"steps:       {steps}; an epoch is {samples / t.batch_size:.1f} steps",
        f"lr:          {scaled} ({t.optimizer}, weight decay {t.weight_decay:g})",
        f"data:        {redact(d.train)}: {samples} samples in {len(manifest['shards'])} shards",
        f"loader:      {loader} ({why}), {d.num_workers} worker(s) per rank, "
        f"{sum(v.count for v in d.views)} view(s) per sample",
        f"precision:   {'bf16 autocast' if amp is not None else 'fp32'} (train.precision={t.precision}"
        f"{precision_reason(device) if t.precision == 'auto' else ''})",
        f"evaluation:  {evaluation}",
        f"MLflow:      {resolve_tracking_uri(cfg.mlflow.tracking_uri)}, experiment "
        f"{cfg.mlflow.experiment}" + (f", registers {cfg.mlflow.registered_model}" if cfg.mlflow.registered_model
                                      else ""),
    ]



def precision_reason(device) -> str:
    """Why train.precision=auto chose what it did (pipeline.train.runtime.autocast_dtype's rule)."""
    if device.type == "cuda":
        return f": this GPU {'has' if torch.cuda.is_bf16_supported() else 'lacks'} bf16"
    return f": this CPU has {'AMX or AVX512-BF16' if cpu_has_fast_bf16() else 'neither AMX nor AVX512-BF16'}"
