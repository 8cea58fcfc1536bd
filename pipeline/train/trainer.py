"""The pretraining loop: one code path for 1 CPU process, torchrun on CPUs (gloo) and GPU
clusters (NCCL); only ``pipeline.train.runtime`` differs. How ranks share the model, gradients and
optimizer state is the strategy's (``pipeline.train.strategy``: DDP or DeepSpeed ZeRO).

Per optimizer step: ``grad_accum_steps`` micro-batches (gradient sync only on the last), bf16
autocast where fast, gradient-norm (and optional clipping), LARS/AdamW/SGD, warmup + cosine
schedule (re-fitted as it trains to end on time under ``train.budget_minutes``: ``pipeline.train.budget``),
the method's ``on_step_end`` hook (momentum encoders). Every
``checkpoint_every`` steps an atomic checkpoint holds everything needed to continue bitwise:
model, optimizer, step, every rank's RNG state, the loader position and the MLflow run id, all
as tensors and plain values (it is loaded with ``weights_only=True``).

Tracking never stops or delays a step: metrics are queued in memory and sent by the tracker's own
thread (``pipeline.registry.tracking``), so no network call stands between a step and its checkpoint; before
each checkpoint, what the server has not received yet is written beside it, so that a kill loses no
logged step. ``train`` holds the output_dir's lock (``pipeline.train.output_lock``) and removes what
killed checkpoint writers left behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from ssl_foundry.data_prep.console import Progress, log_file, process_rank, setup_logging
from ssl_foundry.data_prep.shard_format import read_manifest
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.distributed import all_reduce_mean, convert_to_global_batchnorm
from ssl_foundry.models.method import Method
from ssl_foundry.models.registry import create_method, takes_teacher
from ssl_foundry.pipeline.config import Config, flatten, public_dict, save_config, split_batch
from ssl_foundry.pipeline.data.labelled_subset import labelled_keys, mask_unlabelled
from ssl_foundry.pipeline.data.loader import build_train_loader, train_backend
from ssl_foundry.pipeline.data.position import LoaderPosition
from ssl_foundry.pipeline.evaluate.knn import KnnResult, attach_knn_monitor, distributed_knn, iter_features
from ssl_foundry.pipeline.registry.export import export_timm_backbone
from ssl_foundry.pipeline.registry.teacher import Teacher, load_teacher
from ssl_foundry.pipeline.registry.tracking import (RunTracker, TrackingUnavailable, default_artifact_location,
                                                    resolve_tracking_uri)
from ssl_foundry.pipeline.registry.tracking_server import TrackingError
from ssl_foundry.pipeline.train.budget import PROBE_STEPS, SKIP_STEPS, BudgetClock, extraction_estimate_s
from ssl_foundry.pipeline.train.checkpoint import (CheckpointError, checkpoint_step, list_checkpoints, remove_stale_temps,
                                                   world_size_mismatch)
from ssl_foundry.pipeline.train.optim import WeightDecaySchedule, base_lr
from ssl_foundry.pipeline.train.output_lock import OutputDirLock
from ssl_foundry.pipeline.train.run_dir import plan_run, set_aside_previous_run
from ssl_foundry.pipeline.train.runtime import Runtime, init_runtime, shutdown_runtime, start_collective_timeout
from ssl_foundry.pipeline.train.schedule import CosinePlan, initial_plan, refit, schedule_position
from ssl_foundry.pipeline.train.strategy import create_strategy


logger = logging.getLogger(__name__)

# Rank 0's log lines of every process that trains in an output_dir, appended (and logged to MLflow).
RUN_LOG = "train.log"

# How long a failing run waits for an unreachable tracking server to record the failure.
FAILURE_REPORT_WAIT_S = 30.0

# Batches of data.eval_test the feature-extraction probe of a whole-run budget reads: the first
# pays for starting the loader, the others give the steady rate.
EXTRACTION_PROBE_BATCHES = 3


class NonFiniteLossError(RuntimeError):
    """The loss went NaN/inf; the message names the step, the last good checkpoint and what to change."""

    exit_status = 1


class TrainingInterrupted(Exception):
    """Raised on every rank when ``Trainer.stop_check`` asked to stop (a Slurm preemption or
    time-limit signal): the checkpoint of ``step`` is written (``checkpoint``, rank 0 only)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"training interrupted at step {step}; checkpoint: {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    """What rank 0 reports at the end of ``train`` (also written to ``output_dir/result.json``)."""

    output_dir: str
    steps: int
    final_loss: float
    run_id: str | None = None
    tracking_uri: str | None = None
    backbone_dir: str | None = None
    model_version: str | None = None
    knn_top1: float | None = None
    timing: dict[str, float] = field(default_factory=dict)
    # Per rank, MiB, at the end of training (``_memory_mb``): rss, peak_rss; on a GPU also cuda,
    # peak_cuda.
    memory_mb: dict[str, list[float]] = field(default_factory=dict)


def build_model(cfg: Config, teacher: Teacher | None = None) -> Method:
    """The method around a new timm backbone; a distillation method also gets its frozen teacher
    (``teacher``, or ``model.teacher`` loaded here)."""
    backbone = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
    if takes_teacher(cfg.model.method) and teacher is None:
        teacher = load_teacher(cfg)
    model = create_method(cfg.model.method, backbone, teacher=teacher.module if teacher else None,
                          **cfg.model.method_args)
    if cfg.train.global_batchnorm:
        convert_to_global_batchnorm(model)
    if cfg.train.activation_checkpointing:
        # After the method is built: its momentum target (a copy) runs without gradients anyway.
        model.backbone.set_grad_checkpointing(True)
    return model


class WarmupCosineSchedule(CosineLRScheduler):
    """timm's warmup + cosine (with each group's ``lr_scale``), except for the param groups marked
    ``fixed_lr`` (SimSiam's predictor), which keep the base lr throughout."""

    def update_groups(self, values) -> None:
        super().update_groups(values)
        for group in self.optimizer.param_groups:
            if group.get("fixed_lr"):
                group["lr"] = group["initial_lr"]


class StepSchedule:
    """What the optimizer's param groups follow step by step: the lr, and the weight decay when
    ``train.weight_decay_end`` is set, both built for ``total_steps``. ``step_update(k)`` sets the
    values of step k (0-based); ``refit(k, total)`` ends both at step ``total`` instead, with no jump
    at step k (``pipeline.train.schedule``: each step's position on the built schedules)."""

    def __init__(self, lr: WarmupCosineSchedule, total_steps: int, weight_decay: WeightDecaySchedule | None = None):
        self.lr, self.weight_decay = lr, weight_decay
        self.lr_plan = initial_plan(total_steps, lr.warmup_t)
        self.weight_decay_plan = initial_plan(total_steps, 0)  # DINO's weight decay has no warmup

    @property
    def total_steps(self) -> int:
        return self.lr_plan.total_steps

    def step_update(self, step: int) -> None:
        self.lr.step_update(schedule_position(self.lr_plan, step, self.lr.warmup_t, self.lr.t_initial))
        if self.weight_decay is not None:
            self.weight_decay.step_update(
                schedule_position(self.weight_decay_plan, step, 0, self.weight_decay.total_steps))

    def refit(self, step: int, total_steps: int) -> None:
        self.lr_plan = refit(self.lr_plan, step, total_steps)
        self.weight_decay_plan = refit(self.weight_decay_plan, step, total_steps)

    def state_dict(self) -> dict[str, dict]:
        return {"lr": dataclasses.asdict(self.lr_plan), "weight_decay": dataclasses.asdict(self.weight_decay_plan)}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self.lr_plan, self.weight_decay_plan = CosinePlan(**state["lr"]), CosinePlan(**state["weight_decay"])


def build_scheduler(cfg: Config, optimizer, total_steps: int) -> StepSchedule:
    """Linear warmup over ``train.warmup_steps``, then cosine to ``train.min_lr`` at ``total_steps``;
    with ``train.weight_decay_end``, the weight decay's cosine over the ``total_steps`` too. Both
    are pure functions of the step and the plan, which a time budget re-fits (``StepSchedule.refit``).
    """
    t = cfg.train
    lr = base_lr(cfg)
    for group in optimizer.param_groups:
        # The config's lr, not one restored with the optimizer: a run resumed with a lower
        # train.lr (the fix for a non-finite loss) must train with it.
        group["initial_lr"] = lr
    lr_schedule = WarmupCosineSchedule(
        optimizer, t_initial=max(1, total_steps - t.warmup_steps), lr_min=t.min_lr, warmup_t=t.warmup_steps,
        warmup_lr_init=lr * 1e-3 if t.warmup_steps else 0.0, warmup_prefix=True, t_in_epochs=False,
    )
    weight_decay = (None if t.weight_decay_end is None
                    else WeightDecaySchedule(optimizer, t.weight_decay, t.weight_decay_end, total_steps))
    return StepSchedule(lr_schedule, total_steps, weight_decay)


def scheduled_lr(optimizer) -> float:
    """The lr the schedule gives the weights now (not a group's multiple or fixed lr)."""
    return next(g["lr"] for g in optimizer.param_groups if "lr_scale" not in g and not g.get("fixed_lr"))


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (numpy's MT19937 key as a tensor)."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _memory_mb(device: torch.device) -> dict[str, float]:
    """This process's memory, MiB: resident now (after training steps: model, gradients, optimizer
    state, allocator caches) and its high-water mark (which includes start-up transients, e.g. the
    copy DeepSpeed makes while flattening parameters, and activations); on a GPU, torch's allocated
    and peak allocated device memory."""
    memory = {"rss": psutil.Process().memory_info().rss / 2**20,
              "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        memory.update(cuda=torch.cuda.memory_allocated(device) / 2**20,
                      peak_cuda=torch.cuda.max_memory_allocated(device) / 2**20)
    return memory


def gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if rt.world_size == 1:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def _open_tracker(cfg: Config, run_id: str | None):
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    tracker = RunTracker(uri, cfg.mlflow.experiment, run_name=cfg.mlflow.run_name, run_id=run_id,
                         artifact_location=default_artifact_location(uri),
                         spool=Path(cfg.output_dir) / "mlflow-unsent.jsonl", outage_s=60 * cfg.mlflow.outage_minutes,
                         tensorboard_dir=str(Path(cfg.output_dir) / "tensorboard") if cfg.mlflow.tensorboard else None)
    if run_id is None:
        tracker.log_params(flatten(public_dict(cfg)))
        tracker.log_environment()
    return tracker


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rt = init_runtime(cfg.launch, cfg.train)
        self.out = Path(cfg.output_dir)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.teacher = load_teacher(cfg) if takes_teacher(cfg.model.method) else None
        self.model = build_model(cfg, self.teacher).to(self.rt.device)
        if cfg.train.channels_last and cfg.train.strategy == "ddp":
            # DeepSpeed flattens parameters into contiguous buffers (and cannot broadcast strided
            # ones); there only the inputs are channels_last, which is what selects the conv kernels.
            self.model = self.model.to(memory_format=torch.channels_last)
        d = cfg.data
        self.backend, self.backend_why = train_backend(d.backend, self.rt.device, d.train)
        # This rank's samples per forward pass; the torch loader's readers each make an equal part of it.
        self.local_batch = split_batch(cfg.train.batch_size, self.rt.world_size, cfg.train.grad_accum_steps,
                                       readers=d.readers if self.backend in ("torch", "batched") else None,
                                       num_workers=d.num_workers)
        self.strategy = create_strategy(cfg, self.model, self.rt, self.local_batch)
        self.optimizer = self.strategy.optimizer
        # train.ema_decay: what is evaluated and exported is a moving average of the backbone.
        self.ema = (ModelEmaV3(self.model.get_submodule(self.model.exported_backbone), decay=cfg.train.ema_decay,
                               use_warmup=True, warmup_power=3 / 4) if cfg.train.ema_decay > 0 else None)
        # train.budget_minutes: the run's length is re-fitted to the time left as it trains.
        self.budget = (BudgetClock(60 * cfg.train.budget_minutes, cfg.train.budget_covers)
                       if cfg.train.budget_minutes > 0 else None)
        # Methods with uses_labels (S4L, SLA) get the batch's labels, -1 outside data.labelled_fraction.
        self.labelled_keys = (labelled_keys(cfg.data.train, cfg.data.labelled_fraction, cfg.train.seed)
                              if self.model.uses_labels and cfg.data.labelled_fraction < 1 else None)
        self.step = 0
        self.step_times: list[tuple[float, float]] = []  # (data wait, compute) seconds per step
        self.train_seconds = 0.0  # wall time of this process's training loop
        self.step_callbacks: list[Callable[[int], None]] = []  # called with the step after each one
        # Polled after every step; True on any rank: all ranks checkpoint and raise TrainingInterrupted.
        self.stop_check: Callable[[], bool] | None = None
        self.position = LoaderPosition()
        # Samples of the current epoch skipped by data.on_bad_sample=skip: this rank's (after a resume,
        # rank 0 also holds every rank's count from before the checkpoint).
        self.skipped_samples = 0
        self.run_id: str | None = None
        self.loss = float("nan")  # of the last step trained (or restored)
        self.resumed_from: Path | None = None
        plan = plan_run(cfg)  # refuses to continue a run started with another config
        if plan.replaces is not None and self.rt.is_main:
            logger.info("train.resume=never: the run in %s moved to %s", self.out, set_aside_previous_run(self.out))
        resume = plan.checkpoint
        self._budget_state: dict | None = None
        self.end_timing: dict[str, float] = {}  # measured after the loop (budget used, final checkpoint)
        if resume is not None:
            self._restore(resume)
        # Steps this run trains for (self.total_steps): train.max_steps, or what the time budget fits.
        self.scheduler = build_scheduler(cfg, self.optimizer, cfg.train.max_steps)
        if self._budget_state is not None:
            # A time-budgeted run goes on with the plan and the budget time used before the
            # interruption; any other run takes train.max_steps from the config.
            self.scheduler.load_state_dict(self._budget_state["schedule"])
            if self.total_steps > cfg.train.max_steps:
                self.scheduler.refit(self.step, cfg.train.max_steps)
            self.budget.used_before_s = self._budget_state["used_s"]
        torch.manual_seed(cfg.train.seed + 1000 * self.rt.rank + self.step)
        self.tracker = _open_tracker(cfg, self.run_id) if self.rt.is_main else None
        if self.tracker is not None:
            if self.run_id is None and self.teacher is not None:  # a new run: the teacher's lineage
                self.tracker.set_tags({f"lineage.teacher.{k}": v for k, v in self.teacher.lineage().items()})
            self.run_id = self.tracker.run_id
            save_config(cfg, self.out / "config.yaml")
            self.tracker.log_artifact(str(self.out / "config.yaml"))
            if hasattr(self.strategy, "ds_config"):  # the DeepSpeed JSON this run really used
                (self.out / "deepspeed_config.json").write_text(json.dumps(self.strategy.ds_config, indent=2))
                self.tracker.log_artifact(str(self.out / "deepspeed_config.json"))
        start_collective_timeout(cfg.launch)

    # ------------------------------------------------------------------ state
    def _restore(self, path: Path) -> None:
        state = self.strategy.load(path)  # model and optimizer restored; the rest is ours
        self.step = state["step"]
        self.position = LoaderPosition(**state["position"])
        if self.budget is not None:
            self._budget_state = state.get("budget")
        self.run_id = state.get("mlflow_run_id")
        self.loss = state.get("loss", float("nan"))
        self.resumed_from = path
        self.skipped_samples = state.get("skipped_samples", 0) if self.rt.is_main else 0
        if self.ema is not None:
            self.ema.module.load_state_dict(state["ema"])
        saved_ranks = state["world_size"]
        if saved_ranks == self.rt.world_size:
            self._rng_to_restore = state["rng"][self.rt.rank]
        elif not state["config"]["data"]["readers"] or state["config"]["data"]["readers"] != self.cfg.data.readers:
            raise world_size_mismatch(path, saved_ranks, self.rt.world_size, state["config"]["data"]["readers"],
                                      self.cfg.data.readers)
        # At another world size (a fixed data.readers: the same batches at any), each rank keeps
        # the seed it was given: no rank's random stream continues another's.
        if self.rt.is_main:
            moved = f" (written by {saved_ranks} ranks, now {self.rt.world_size})"
            logger.info("resumed at step %d from %s%s", self.step, path,
                        moved if saved_ranks != self.rt.world_size else "")

    def save(self) -> Path | None:
        rng = gather_objects(_rng_state(), self.rt)
        state = {
            "step": self.step,
            "skipped_samples": self._sum_over_ranks(self.skipped_samples),
            "budget": None if self.budget is None else {"schedule": self.scheduler.state_dict(),
                                                        "used_s": self.budget.used_s()},
            "position": {"epoch": self.position.epoch, "batch": self.position.batch},
            "rng": rng,
            "world_size": self.rt.world_size,
            "mlflow_run_id": self.run_id,
            "loss": self.loss,
            "config": public_dict(self.cfg),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        if self.tracker is not None:
            self.tracker.persist()  # the steps up to this one are not trained again: their metrics, on disk first
        return self.strategy.save(self.out / "checkpoints", self.step, state)

    @property
    def total_steps(self) -> int:
        return self.scheduler.total_steps

    def trained_backbone(self, checkpoint: Path | None = None) -> torch.nn.Module:
        """What is evaluated and exported: the backbone's moving average (train.ema_decay), else the
        backbone itself (from ``checkpoint`` when the strategy shards it)."""
        if self.ema is not None:
            return self.ema.module
        if checkpoint is None:
            return self.model.get_submodule(self.model.exported_backbone)
        return self.strategy.consolidated_backbone(checkpoint)

    # ------------------------------------------------------------------ loop
    def _loader(self):
        if self.rt.is_main:
            logger.info("training loader: %s on %s (%s)", self.backend, self.rt.device.type, self.backend_why)
        return build_train_loader(self.cfg.data, self.local_batch, self.model.input_kind, self.cfg.train.seed,
                                  self.rt.rank, self.rt.world_size, self.position, self.rt.device)

    def _to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images (B, 3, H, W) channels_last when asked; clips (B, T, 3, H, W) then in (B, T, H, W, 3)
        memory, so that the frames the video methods flatten them to, (B T, 3, H, W), are channels_last."""
        if not self.cfg.train.channels_last:
            return [v.to(self.rt.device, non_blocking=True) for v in views]
        return [v.to(self.rt.device, non_blocking=True, memory_format=torch.channels_last) if v.dim() == 4
                else v.to(self.rt.device, non_blocking=True).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
                for v in views]

    def _labels(self, batch: dict) -> torch.Tensor | None:
        if not self.model.uses_labels:
            return None
        labels = batch["label"]
        if self.labelled_keys is not None:
            labels = mask_unlabelled(labels, batch["key"], self.labelled_keys)
        return labels.to(self.rt.device, non_blocking=True)

    def train(self) -> TrainResult:
        t = self.cfg.train
        if hasattr(self, "_rng_to_restore"):
            _set_rng_state(self._rng_to_restore)
        if self.tracker is not None:
            self._record_start()
        self.model.train()
        if self.budget is not None and self.budget.covers == "run" and self.rt.is_main:
            self.budget.extraction_s = self._probe_feature_extraction()
        batches = self._loader()
        if self.rt.is_main:
            logger.info("%s %s: steps %d to %d, %d images per step over %d rank(s) on %s, MLflow run %s",
                        self.cfg.model.method, self.cfg.model.backbone, self.step, self.total_steps, t.batch_size,
                        self.rt.world_size, self.rt.device.type, self.run_id)
        train_start = time.perf_counter()
        if self.budget is not None:
            self.budget.start_training()
        with Progress(total=self.total_steps, initial=self.step, desc="pretrain", unit="step",
                      periodic=False) as progress:  # the step lines are the plain lines
            self._train_steps(batches, progress)
        self.train_seconds = time.perf_counter() - train_start
        self._report_skipped_samples()
        self.end_timing = {"budget_used_s": self.budget.used_s()} if self.budget is not None else {}
        memory = gather_objects(_memory_mb(self.rt.device), self.rt)
        tic = time.perf_counter()
        last = self.save()
        self.end_timing["final_checkpoint_s"] = time.perf_counter() - tic
        d = self.cfg.data
        evaluate = self.cfg.eval.after_pretrain and d.eval_train and d.eval_test
        backbone = self.trained_backbone(last) if evaluate or self.rt.is_main else None
        knn = distributed_knn(backbone, self.cfg, self.rt) if evaluate else None
        # The ranks' last collective is behind them: rank 0 exports, registers and logs alone, and
        # no rank waits for it in a collective that could time out.
        shutdown_runtime()
        return self._finish(last, memory, backbone, knn)

    def _train_steps(self, batches, progress: Progress) -> None:
        """Steps until ``total_steps`` (or a stop request)."""
        t = self.cfg.train
        data_wait = 0.0
        window_start, window_steps = time.perf_counter(), 0
        while self.step < self.total_steps:
            self.scheduler.step_update(self.step)
            step_lr = scheduled_lr(self.optimizer)  # logged: what this step trains with
            step_wd = max(group["weight_decay"] for group in self.optimizer.param_groups)
            step_loss = torch.zeros((), device=self.rt.device)
            step_wait = step_compute = 0.0
            for micro in range(t.grad_accum_steps):
                tic = time.perf_counter()
                batch = next(batches)
                toc = time.perf_counter()
                step_wait += toc - tic
                if batch["epoch"] != self.position.epoch:
                    self._report_skipped_samples()
                self._note_skipped(batch.get("skipped", []))
                self.position = LoaderPosition(batch["epoch"], batch["batch"] + 1)
                loss = self.strategy.forward_backward(self._to_device(batch["views"]),
                                                      sync=micro == t.grad_accum_steps - 1, labels=self._labels(batch))
                step_loss += loss / t.grad_accum_steps
                step_compute += time.perf_counter() - toc
            tic = time.perf_counter()
            self.loss = float(all_reduce_mean(step_loss))
            if not math.isfinite(self.loss):
                self._fail_non_finite(self.loss)
            grad_norm = self.strategy.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model.get_submodule(self.model.exported_backbone), step=self.step)
            self.model.on_step_end(self.step, self.total_steps)
            step_compute += time.perf_counter() - tic
            self.step_times.append((step_wait, step_compute))
            for callback in self.step_callbacks:
                callback(self.step)
            if self.budget is not None:
                self._fit_to_budget()
            progress.total = self.total_steps  # a time budget re-fits it
            progress.update()
            data_wait += step_wait
            window_steps += 1
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": self.loss,
                    "lr": step_lr,
                    "weight_decay": step_wd,
                    "grad_norm": grad_norm,
                    "images_per_s": window_steps * t.batch_size / elapsed,
                    "step_time_s": elapsed / window_steps,
                    "data_wait_fraction": data_wait / max(elapsed, 1e-9),
                    "epoch": float(self.position.epoch),
                }
                if self.budget is not None:
                    metrics.update(budget_total_steps=float(self.total_steps), budget_used_s=self.budget.used_s())
                self._log(metrics, progress)  # queued, no I/O: the tracker's thread sends it
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if self.step % t.checkpoint_every == 0 and self.step < self.total_steps:
                if self.budget is None:
                    self.save()
                else:
                    tic = self.budget.clock()
                    self.save()
                    self.budget.record_checkpoint(self.budget.clock() - tic, t.checkpoint_every)
            if self.stop_check is not None and self.step < self.total_steps and self._any_rank(self.stop_check()):
                path = self.save()
                if self.rt.is_main:
                    logger.info("stop requested: checkpoint of step %d written to %s", self.step, path)
                raise TrainingInterrupted(self.step, path)

    def _record_start(self) -> None:
        """The world size each (re)start trains at, as the metric ``world_size`` at its first step;
        a resume also counts in the tag ``restarts`` (an elastic restart, a Slurm requeue, a rerun)."""
        self.tracker.log_metrics({"world_size": self.rt.world_size}, step=self.step)
        if self.resumed_from is not None:
            restarts = int(self.tracker.tags.get("restarts", "0")) + 1
            self.tracker.set_tags({"restarts": str(restarts), f"restart.{restarts}":
                                   f"step {self.step} from {self.resumed_from.name}, {self.rt.world_size} ranks"})

    def _note_skipped(self, skipped: list[str]) -> None:
        """Every sample data.on_bad_sample=skip left out, a warning of the rank that met it, and counted."""
        for what in skipped:
            logger.warning("skipped %s (data.on_bad_sample=skip)", what)
        self.skipped_samples += len(skipped)

    def _report_skipped_samples(self) -> None:
        """At the end of an epoch (and of training): the samples skipped in it over all ranks, printed
        and logged to MLflow as ``skipped_samples`` (at the step reached), then the count restarts."""
        if self.cfg.data.on_bad_sample != "skip":
            return
        total = self._sum_over_ranks(self.skipped_samples)
        self.skipped_samples = 0
        if self.rt.is_main:
            logger.info("epoch %d: %d bad samples skipped (data.on_bad_sample=skip)", self.position.epoch, total)
            self.tracker.log_metrics({"skipped_samples": total}, step=self.step)

    def _sum_over_ranks(self, count: int) -> int:
        if self.rt.world_size == 1:
            return count
        value = torch.tensor([count], dtype=torch.int64, device=self.rt.device)
        dist.all_reduce(value)
        return int(value.item())

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (so all ranks stop at the same step)."""
        if self.rt.world_size == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.rt.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _fit_to_budget(self) -> None:
        """Records the step just done and re-fits the run's length to the time budget (once enough
        steps are measured): decided on rank 0 from its measurements (``BudgetClock``) and
        broadcast, so every rank stops at the same step; the schedules are re-anchored so the lr and
        weight decay go on without a jump (``StepSchedule.refit``)."""
        self.budget.record_step()
        if not self.budget.ready():
            return
        t, first = self.cfg.train, self.budget.seen == SKIP_STEPS + PROBE_STEPS
        total = self.budget.total_steps(self.step, t.max_steps) if self.rt.is_main else 0
        if self.rt.world_size > 1:
            decided = torch.tensor([total], dtype=torch.int64, device=self.rt.device)
            dist.broadcast(decided, src=0)
            total = int(decided.item())
        if total != self.total_steps:
            self.scheduler.refit(self.step, total)
        if first and self.rt.is_main:
            end = f", {self.budget.end_s():.0f} s kept for the end of the run" if t.budget_covers == "run" else ""
            logger.info("time budget %g min (%s): %.0f s used, %.3f s/step%s: training %d steps (re-fitted after "
                        "every step)", t.budget_minutes, t.budget_covers, self.budget.used_s(), self.budget.step_s(),
                        end, self.total_steps)

    def _probe_feature_extraction(self) -> float:
        """Seconds the end-of-run kNN will spend extracting the features of data.eval_train and
        data.eval_test, measured by the same extraction code on a few batches of data.eval_test with
        a fresh backbone of the same architecture (the same cost; the trained one and the RNG
        stay untouched)."""
        d, e = self.cfg.data, self.cfg.eval
        if not (e.after_pretrain and d.eval_train and d.eval_test):
            return 0.0
        with torch.random.fork_rng(devices=[]):
            backbone = create_backbone(self.cfg.model.backbone, **self.cfg.model.backbone_args).to(self.rt.device)
        seconds, images = [], []
        tic = time.perf_counter()
        with contextlib.closing(iter_features(backbone, d.eval_test, d.eval_image_size, d.mean, d.std,
                                              e.batch_size, d.num_workers, self.rt.device)) as batches:
            for features, _ in itertools.islice(batches, EXTRACTION_PROBE_BATCHES):
                seconds.append(time.perf_counter() - tic)
                images.append(len(features))
                tic = time.perf_counter()
        steady = slice(1, None) if len(seconds) > 1 else slice(None)  # the first batch starts the loader
        image_s = sum(seconds[steady]) / sum(images[steady])
        startup_s = max(0.0, seconds[0] - images[0] * image_s)
        total = sum(read_manifest(folder)["num_samples"] for folder in (d.eval_train, d.eval_test))
        return extraction_estimate_s(2, startup_s, total, image_s)

    def completed_result(self) -> TrainResult | None:
        """The recorded result when the resumed checkpoint is this run's finished last step (its
        result.json says so): nothing is trained, exported or registered again. A run that died
        while finishing (last checkpoint written, no result) is finished by ``train``."""
        recorded = self.out / "result.json"
        if self.step < self.total_steps or not recorded.is_file():
            return None
        result = TrainResult(**json.loads(recorded.read_text()))
        if result.steps != self.step:
            return None
        if self.rt.is_main:
            logger.info("%s already finished at step %d (see %s): nothing to do. Set train.resume=never for a "
                        "new run, or raise train.max_steps to train on.", self.out, self.step, recorded)
            self.tracker.end("FINISHED")
        return result

    def _log(self, metrics: dict[str, float], progress: Progress) -> None:
        if not self.rt.is_main:
            return
        self.timing = metrics
        self.tracker.log_metrics(metrics, step=self.step)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        # Elapsed and eta of this process's steps, at their mean pace (knn monitor and checkpoints included).
        timing = progress.meter("elapsed {elapsed}, eta {remaining}", average=True)
        logger.info("step %d/%d loss %.4f lr %.4g %.0f %s/s data-wait %.0f%%, %s", self.step, self.total_steps,
                    metrics["loss"], metrics["lr"], metrics["images_per_s"], self._sample_unit(),
                    100 * metrics["data_wait_fraction"], timing)

    def _sample_unit(self) -> str:
        """What a sample of the batch is: an image, or a clip for the video methods (whose metric
        ``images_per_s`` then counts clips)."""
        return "clips" if self.model.input_kind == "clip" else "img"

    def end_failed(self, err: BaseException) -> None:
        """Rank 0: the reason in train.log, train.log into the MLflow run, and the run marked KILLED
        (interrupted) or FAILED, with a one-line reason as the tag ``failure`` for the errors that
        have one; a server that does not answer within FAILURE_REPORT_WAIT_S is warned about, not
        waited for (the error itself is what matters)."""
        if not isinstance(err, TrainingInterrupted):  # that one has said where its checkpoint is
            logger.error("stopped after step %d: %s", self.step, f"{type(err).__name__}: {err}" if str(err)
                         else type(err).__name__)
        if isinstance(err, TrackingError):
            return  # the store is not answering
        self.tracker.outage_s = FAILURE_REPORT_WAIT_S
        try:
            self.upload_run_log()
            if isinstance(err, NonFiniteLossError):
                return  # already FAILED with its reason
            if isinstance(err, CheckpointError):
                self.tracker.set_tags({"failure": str(err)})
            interrupted = isinstance(err, (KeyboardInterrupt, TrainingInterrupted))
            self.tracker.end("KILLED" if interrupted else "FAILED", wait_s=FAILURE_REPORT_WAIT_S)
        except TrackingUnavailable as unreachable:
            logger.warning("%s", unreachable)

    def _fail_non_finite(self, loss_value: float) -> None:
        # A checkpoint of the current step holds the very weights that gave this loss: resuming
        # from it fails again. Move it out of train.resume=auto's way (kept for debugging).
        folder = self.out / "checkpoints"
        bad = next((p for p in list_checkpoints(folder) if checkpoint_step(p) == self.step), None)
        aside = ""
        if bad is not None:
            if self.rt.is_main:
                os.replace(bad, bad.with_name(bad.name + ".nonfinite"))
            aside = f" ({bad.name}, whose weights gave this loss, was renamed to {bad.name}.nonfinite)"
        last = next((p for p in reversed(list_checkpoints(folder)) if p != bad), None)
        msg = (f"loss is {loss_value} at step {self.step + 1}: training stopped. The last good "
               f"checkpoint is {last or 'none (no checkpoint written yet)'}{aside}; lower train.lr, set "
               f"train.grad_clip, or try train.precision=fp32, then "
               + (f"continue from it with train.resume={last} (train.resume=auto continues only an unchanged "
                  f"config)." if last else "rerun with train.resume=never."))
        if self.tracker is not None:
            self.tracker.set_tags({"failure": msg})
            self.tracker.end("FAILED")
        raise NonFiniteLossError(msg)

    def _run_timing(self) -> dict[str, float]:
        """This process's training time, and its steady throughput: the median step after the
        first SKIP_STEPS (worker start-up, allocator warm-up), loader waits included."""
        steady = [w + c for w, c in self.step_times[SKIP_STEPS:]] or [w + c for w, c in self.step_times]
        if not steady:
            return {}
        step_s = statistics.median(steady)
        return {"train_s": self.train_seconds, "steady_step_time_s": step_s,
                "steady_images_per_s": self.cfg.train.batch_size / step_s}

    def _finish(self, last_checkpoint: Path | None, memory: list[dict[str, float]],
                backbone: torch.nn.Module | None, knn: KnnResult | None) -> TrainResult:
        """Rank 0, after the process group is gone: artifacts, export, registration, metrics."""
        result = TrainResult(output_dir=str(self.out), steps=self.step, final_loss=self.loss)
        if not self.rt.is_main:
            return result
        tic = time.perf_counter()
        d, m = self.cfg.data, self.cfg.model
        result.run_id, result.tracking_uri = self.tracker.run_id, self.tracker.tracking_uri
        result.timing = {**getattr(self, "timing", {}), **self._run_timing(), **self.end_timing}
        result.memory_mb = {key: [rank[key] for rank in memory] for key in memory[0]}
        self.tracker.log_metrics({f"{key}_mb_rank{r}": value for key, values in result.memory_mb.items()
                                  for r, value in enumerate(values)}, step=self.step)
        backbone_dir = export_timm_backbone(
            backbone, m.backbone, m.backbone_args, self.out / "backbone",
            input_size=(3, d.eval_image_size, d.eval_image_size), mean=tuple(d.mean), std=tuple(d.std),
            extra={"method": m.method, "steps": self.step, "mlflow_run_id": self.tracker.run_id,
                   **({"teacher": self.teacher.lineage()} if self.teacher else {})},
        )
        result.backbone_dir = str(backbone_dir)
        # Uploads wait for an unreachable server (mlflow.outage_minutes); the export is on disk already.
        self.tracker.log_artifact(str(last_checkpoint), f"checkpoints/{last_checkpoint.name}"
                                  if last_checkpoint.is_dir() else "checkpoints")
        result.model_version = self.tracker.log_backbone(str(backbone_dir), self.cfg.mlflow.registered_model, self.step)
        result.timing["export_register_s"] = time.perf_counter() - tic
        registered = f", registered as models:/{self.cfg.mlflow.registered_model}/{result.model_version}" \
            if result.model_version else ""
        logger.info("backbone exported to %s, logged as the run's MLflow model%s", backbone_dir, registered)
        if knn is not None:
            result.knn_top1, result.timing["knn_s"] = knn.top1, knn.seconds
            self.tracker.log_metrics({"knn_top1": knn.top1, **{
                f"knn_images_rank{r}": bank + queries
                for r, (bank, queries) in enumerate(zip(knn.bank_per_rank, knn.queries_per_rank))}}, step=self.step)
            logger.info("kNN top-1 %.2f%% (k=%d)", 100 * knn.top1, self.cfg.eval.knn_k)
        if self.budget is not None and self.budget.covers == "run":
            result.timing["budget_used_s"] = self.budget.used_s()  # the whole run, its kNN included
        self.upload_run_log()
        self.tracker.end("FINISHED")
        return result

    def upload_run_log(self) -> None:
        """``<output_dir>/train.log`` (as far as it is written) into the MLflow run (rank 0)."""
        path = self.out / RUN_LOG
        if path.is_file():
            self.tracker.log_artifact(str(path))


def train(cfg: Config, setup: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Entry point of every rank (direct, torchrun, elastic launch or submitit). ``setup`` is
    called with the constructed Trainer before training (launch/slurm.py sets ``stop_check``).
    Rank 0 holds the output_dir's lock for the run (or its launcher does) and appends its log lines
    to ``<output_dir>/train.log``."""
    setup_logging()
    rank_zero = process_rank()[0] == 0
    with OutputDirLock(cfg.output_dir) if rank_zero else nullcontext(), \
            log_file(Path(cfg.output_dir) / RUN_LOG) if rank_zero else nullcontext():
        folder = Path(cfg.output_dir) / "checkpoints"
        if rank_zero and (stale := remove_stale_temps(folder)):
            logger.info("removed what killed checkpoint writers left in %s: %s", folder,
                        ", ".join(p.name for p in stale))
        trainer = Trainer(cfg)
        try:
            if cfg.eval.knn_every:
                attach_knn_monitor(trainer)
            if setup is not None:
                setup(trainer)
            result = trainer.completed_result() or trainer.train()
        except BaseException as err:
            rt = trainer.rt
            err.add_note(f"(rank {rt.rank} of {rt.world_size}, pid {os.getpid()}, after step {trainer.step})")
            if trainer.tracker is not None:
                trainer.end_failed(err)
            shutdown_runtime()
            raise
        shutdown_runtime()
        if trainer.rt.is_main:
            (Path(cfg.output_dir) / "result.json").write_text(json.dumps(result.__dict__, indent=2))
        return result
