"""The pretraining loop: one code path for 1 CPU process, torchrun on CPUs (gloo) and GPU
clusters (NCCL); only ``pipeline.train.runtime`` differs. How ranks share the model, gradients and
optimizer state is the strategy's (``pipeline.train.strategy``: DDP or DeepSpeed ZeRO).

Per optimizer step: ``grad_accum_steps`` micro-batches (gradient sync only on the last), bf16
autocast where fast, gradient-norm (and optional clipping), LARS/AdamW/SGD, timm's warmup +
cosine schedule, the method's ``on_step_end`` hook (momentum encoders). Every
``checkpoint_every`` steps an atomic checkpoint holds everything needed to continue bitwise:
model, optimizer, step, every rank's RNG state, the loader position and the MLflow run id.
"""
from __future__ import annotations

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

from ssl_foundry.data_prep.console import Progress, log_file, process_rank, setup_logging
from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.distributed import all_reduce_mean, convert_to_global_batchnorm
from ssl_foundry.models.registry import create_method, takes_teacher
from ssl_foundry.pipeline.config import Config, flatten, public_dict, save_config
from ssl_foundry.pipeline.data.labelled_subset import labelled_keys, mask_unlabelled
from ssl_foundry.pipeline.data.loader import build_train_loader, train_backend
from ssl_foundry.pipeline.data.position import LoaderPosition
from ssl_foundry.pipeline.evaluate.knn import knn_evaluate
from ssl_foundry.pipeline.registry.export import export_timm_backbone
from ssl_foundry.pipeline.registry.teacher import Teacher, load_teacher
from ssl_foundry.pipeline.registry.tracking import RunTracker, default_artifact_location, resolve_tracking_uri
from ssl_foundry.pipeline.train.checkpoint import checkpoint_step, latest_checkpoint, list_checkpoints
from ssl_foundry.pipeline.train.optim import WeightDecaySchedule, base_lr
from ssl_foundry.pipeline.train.runtime import Runtime, init_runtime, shutdown_runtime
from ssl_foundry.pipeline.train.strategy import create_strategy


logger = logging.getLogger(__name__)

# Rank 0's log lines of every process that trains in an output_dir, appended (and logged to MLflow).
RUN_LOG = "train.log"

# Time budgets: steps left out of the step-time estimate (loader workers still catching up: these
# ran ~30% slower than the steady state in the demo), then steps whose median is the estimate.
BUDGET_SKIP_STEPS, BUDGET_PROBE_STEPS = 5, 10


class NonFiniteLossError(RuntimeError):
    pass


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


def build_model(cfg: Config, teacher: Teacher | None = None) -> torch.nn.Module:
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


def local_batch_size(cfg: Config, world_size: int) -> int:
    per_step = world_size * cfg.train.grad_accum_steps
    if cfg.train.batch_size % per_step:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by ranks x grad_accum_steps "
            f"= {world_size} x {cfg.train.grad_accum_steps}"
        )
    return cfg.train.batch_size // per_step


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
    ``train.weight_decay_end`` is set. ``step_update(k)`` sets the values of step k (0-based)."""

    def __init__(self, lr: CosineLRScheduler, weight_decay: WeightDecaySchedule | None = None):
        self.lr, self.weight_decay = lr, weight_decay

    def step_update(self, step: int) -> None:
        self.lr.step_update(step)
        if self.weight_decay is not None:
            self.weight_decay.step_update(step)


def build_scheduler(cfg: Config, optimizer, total_steps: int) -> StepSchedule:
    """Linear warmup over ``train.warmup_steps``, then cosine to ``train.min_lr`` at ``total_steps``;
    with ``train.weight_decay_end``, the weight decay's cosine over the ``total_steps`` too.

    Both are pure functions of the step, so rebuilding the scheduler (time budgets, resume)
    changes nothing but the horizon.
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
    if t.weight_decay_end is None:
        return StepSchedule(lr_schedule)
    return StepSchedule(lr_schedule, WeightDecaySchedule(optimizer, t.weight_decay, t.weight_decay_end, total_steps))


def scheduled_lr(optimizer) -> float:
    """The lr the schedule gives the weights now (not a group's multiple or fixed lr)."""
    return next(g["lr"] for g in optimizer.param_groups if "lr_scale" not in g and not g.get("fixed_lr"))


def steps_within_budget(budget_s: float, elapsed_s: float, step: int, step_time_s: float, max_steps: int) -> int:
    """Total steps of a run that has done ``step`` steps in ``elapsed_s`` and goes on at
    ``step_time_s`` per step until ``budget_s``: at least one more step, at most ``max_steps``."""
    remaining = int(max(0.0, budget_s - elapsed_s) / max(step_time_s, 1e-9))
    return max(step + 1, min(max_steps, step + remaining))


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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


def _gather_objects(obj: Any, rt: Runtime) -> list[Any]:
    if rt.world_size == 1:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def _find_resume(cfg: Config) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
    return Path(cfg.train.resume)


def _open_tracker(cfg: Config, run_id: str | None):
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    tracker = RunTracker(uri, cfg.mlflow.experiment, run_name=cfg.mlflow.run_name, run_id=run_id,
                         artifact_location=default_artifact_location(uri),
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
        self.strategy = create_strategy(cfg, self.model, self.rt)
        self.optimizer = self.strategy.optimizer
        # Steps this run trains for: train.max_steps, or fewer once a time budget is measured.
        self.total_steps = cfg.train.max_steps
        self.budget_decided = cfg.train.budget_minutes <= 0
        self.local_batch = local_batch_size(cfg, self.rt.world_size)
        # Methods with uses_labels (S4L, SLA) get the batch's labels, -1 outside data.labelled_fraction.
        self.uses_labels = getattr(self.model, "uses_labels", False)
        self.labelled_keys = (labelled_keys(cfg.data.train, cfg.data.labelled_fraction, cfg.train.seed)
                              if self.uses_labels and cfg.data.labelled_fraction < 1 else None)
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
        resume = _find_resume(cfg)
        if resume is not None:
            self._restore(resume)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
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

    # ------------------------------------------------------------------ state
    def _restore(self, path: Path) -> None:
        state = self.strategy.load(path)  # model and optimizer restored; the rest is ours
        self.step = state["step"]
        self.position = LoaderPosition(**state["position"])
        # A time-budgeted run keeps the horizon it measured before the interruption; any other
        # run takes train.max_steps from the config (a longer schedule on resume is allowed).
        if self.cfg.train.budget_minutes > 0 and state.get("budget_total_steps"):
            self.total_steps = min(state["budget_total_steps"], self.cfg.train.max_steps)
            self.budget_decided = True
        self.run_id = state.get("mlflow_run_id")
        self.skipped_samples = state.get("skipped_samples", 0) if self.rt.is_main else 0
        self._rng_to_restore = state["rng"][self.rt.rank]
        if self.rt.is_main:
            logger.info("resumed at step %d from %s", self.step, path)

    def save(self) -> Path | None:
        rng = _gather_objects(_rng_state(), self.rt)
        state = {
            "step": self.step,
            "skipped_samples": self._sum_over_ranks(self.skipped_samples),
            "budget_total_steps": self.total_steps if self.cfg.train.budget_minutes > 0 and self.budget_decided
            else None,
            "position": {"epoch": self.position.epoch, "batch": self.position.batch},
            "rng": rng,
            "world_size": self.rt.world_size,
            "mlflow_run_id": self.run_id,
            "config": public_dict(self.cfg),
        }
        return self.strategy.save(self.out / "checkpoints", self.step, state)

    # ------------------------------------------------------------------ loop
    def _loader(self):
        if self.rt.is_main:
            backend, why = train_backend(self.cfg.data.backend, self.rt.device, self.cfg.data.train)
            logger.info("training loader: %s on %s (%s)", backend, self.rt.device.type, why)
        return build_train_loader(self.cfg, self.local_batch, self.rt.rank, self.rt.world_size, self.position,
                                  self.rt.device)

    def _to_device(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images (B, 3, H, W) channels_last when asked; clips (B, T, 3, H, W) then in (B, T, H, W, 3)
        memory, so that the frames the video methods flatten them to, (B T, 3, H, W), are channels_last."""
        if not self.cfg.train.channels_last:
            return [v.to(self.rt.device, non_blocking=True) for v in views]
        return [v.to(self.rt.device, non_blocking=True, memory_format=torch.channels_last) if v.dim() == 4
                else v.to(self.rt.device, non_blocking=True).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
                for v in views]

    def _labels(self, batch: dict) -> torch.Tensor | None:
        if not self.uses_labels:
            return None
        labels = batch["label"]
        if self.labelled_keys is not None:
            labels = mask_unlabelled(labels, batch["key"], self.labelled_keys)
        return labels.to(self.rt.device, non_blocking=True)

    def train(self) -> TrainResult:
        t = self.cfg.train
        if hasattr(self, "_rng_to_restore"):
            _set_rng_state(self._rng_to_restore)
        self.model.train()
        batches = self._loader()
        if self.rt.is_main:
            logger.info("%s %s: steps %d to %d, %d images per step over %d rank(s) on %s, MLflow run %s",
                        self.cfg.model.method, self.cfg.model.backbone, self.step, self.total_steps, t.batch_size,
                        self.rt.world_size, self.rt.device.type, self.run_id)
        train_start = time.perf_counter()
        with Progress(total=self.total_steps, initial=self.step, desc="pretrain", unit="step",
                      periodic=False) as progress:  # the step lines are the plain lines
            loss_value = self._train_steps(batches, progress, train_start)
        self.train_seconds = time.perf_counter() - train_start
        self._report_skipped_samples()
        memory = _gather_objects(_memory_mb(self.rt.device), self.rt)
        last = self.save()
        return self._finish(last, loss_value, memory)

    def _train_steps(self, batches, progress: Progress, train_start: float) -> float:
        """Steps until ``total_steps``; returns the last step's loss."""
        t = self.cfg.train
        data_wait = 0.0
        window_start, window_steps = time.perf_counter(), 0
        loss_value = float("nan")
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
            loss_value = float(all_reduce_mean(step_loss))
            if not math.isfinite(loss_value):
                self._fail_non_finite(loss_value)
            grad_norm = self.strategy.step()
            self.step += 1
            if hasattr(self.model, "on_step_end"):
                self.model.on_step_end(self.step, self.total_steps)
            step_compute += time.perf_counter() - tic
            self.step_times.append((step_wait, step_compute))
            for callback in self.step_callbacks:
                callback(self.step)
            if not self.budget_decided and len(self.step_times) == BUDGET_SKIP_STEPS + BUDGET_PROBE_STEPS:
                self._fit_schedule_to_budget(time.perf_counter() - train_start)
                progress.total = self.total_steps
            progress.update()
            data_wait += step_wait
            window_steps += 1
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": loss_value,
                    "lr": step_lr,
                    "weight_decay": step_wd,
                    "grad_norm": grad_norm,
                    "images_per_s": window_steps * t.batch_size / elapsed,
                    "step_time_s": elapsed / window_steps,
                    "data_wait_fraction": data_wait / max(elapsed, 1e-9),
                    "epoch": float(self.position.epoch),
                }
                self._log(metrics, progress)
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if self.step % t.checkpoint_every == 0 and self.step < self.total_steps:
                self.save()
            if self.stop_check is not None and self.step < self.total_steps and self._any_rank(self.stop_check()):
                path = self.save()
                if self.rt.is_main:
                    logger.info("stop requested: checkpoint of step %d written to %s", self.step, path)
                raise TrainingInterrupted(self.step, path)
        return loss_value

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

    def _fit_schedule_to_budget(self, elapsed_s: float) -> None:
        """Sets the run's length from the steady step time (the first BUDGET_SKIP_STEPS steps,
        which pay for worker start-up and allocator warm-up, are left out), decided on rank 0
        and shared, so every rank stops at the same step; the cosine schedule is rebuilt for it."""
        t = self.cfg.train
        step_time = statistics.median(w + c for w, c in self.step_times[BUDGET_SKIP_STEPS:])
        total = [steps_within_budget(60 * t.budget_minutes, elapsed_s, self.step, step_time, t.max_steps)]
        if self.rt.world_size > 1:
            dist.broadcast_object_list(total, src=0)
        self.total_steps, self.budget_decided = total[0], True
        self.scheduler = build_scheduler(self.cfg, self.optimizer, self.total_steps)
        if self.rt.is_main:
            logger.info("time budget %g min at %.3f s/step: training %d steps", t.budget_minutes, step_time,
                        self.total_steps)
            self.tracker.log_params({"train.budget_total_steps": self.total_steps})

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
        return "clips" if getattr(self.model, "input_kind", "image") == "clip" else "img"

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
               f"train.grad_clip, or try train.precision=fp32, then rerun (train.resume=auto "
               f"continues from it).")
        if self.tracker is not None:
            self.tracker.set_tags({"failure": msg})
            self.tracker.end("FAILED")
        raise NonFiniteLossError(msg)

    def _run_timing(self) -> dict[str, float]:
        """This process's training time, and its steady throughput: the median step after the
        first BUDGET_SKIP_STEPS (worker start-up, allocator warm-up), loader waits included."""
        steady = [w + c for w, c in self.step_times[BUDGET_SKIP_STEPS:]] or [w + c for w, c in self.step_times]
        if not steady:
            return {}
        step_s = statistics.median(steady)
        return {"train_s": self.train_seconds, "steady_step_time_s": step_s,
                "steady_images_per_s": self.cfg.train.batch_size / step_s}

    def _finish(self, last_checkpoint: Path | None, loss_value: float, memory: list[dict[str, float]]) -> TrainResult:
        result = TrainResult(output_dir=str(self.out), steps=self.step, final_loss=loss_value)
        if not self.rt.is_main:
            return result
        d, m = self.cfg.data, self.cfg.model
        result.run_id, result.tracking_uri = self.tracker.run_id, self.tracker.tracking_uri
        result.timing = {**getattr(self, "timing", {}), **self._run_timing()}
        result.memory_mb = {key: [rank[key] for rank in memory] for key in memory[0]}
        self.tracker.log_metrics({f"{key}_mb_rank{r}": value for key, values in result.memory_mb.items()
                                  for r, value in enumerate(values)}, step=self.step)
        self.tracker.log_artifact(str(last_checkpoint), f"checkpoints/{last_checkpoint.name}"
                                  if last_checkpoint.is_dir() else "checkpoints")
        backbone = self.strategy.consolidated_backbone(last_checkpoint)
        backbone_dir = export_timm_backbone(
            backbone, m.backbone, m.backbone_args, self.out / "backbone",
            input_size=(3, d.eval_image_size, d.eval_image_size), mean=tuple(d.mean), std=tuple(d.std),
            extra={"method": m.method, "steps": self.step, "mlflow_run_id": self.tracker.run_id,
                   **({"teacher": self.teacher.lineage()} if self.teacher else {})},
        )
        result.backbone_dir = str(backbone_dir)
        result.model_version = self.tracker.log_backbone(str(backbone_dir), self.cfg.mlflow.registered_model, self.step)
        registered = f", registered as models:/{self.cfg.mlflow.registered_model}/{result.model_version}" \
            if result.model_version else ""
        logger.info("backbone exported to %s, logged as the run's MLflow model%s", backbone_dir, registered)
        if self.cfg.eval.after_pretrain and d.eval_train and d.eval_test:
            backbone.eval()
            tic = time.perf_counter()
            result.knn_top1 = knn_evaluate(backbone, self.cfg, self.rt.device)
            result.timing["knn_s"] = time.perf_counter() - tic
            self.tracker.log_metrics({"knn_top1": result.knn_top1}, step=self.step)
            logger.info("kNN top-1 %.2f%% (k=%d)", 100 * result.knn_top1, self.cfg.eval.knn_k)
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
    Rank 0 appends its log lines to ``<output_dir>/train.log``."""
    setup_logging()
    with log_file(Path(cfg.output_dir) / RUN_LOG) if process_rank()[0] == 0 else nullcontext():
        return _train(cfg, setup)


def _train(cfg: Config, setup: Callable[[Trainer], None] | None) -> TrainResult:
    trainer = Trainer(cfg)
    try:
        if setup is not None:
            setup(trainer)
        result = trainer.completed_result() or trainer.train()
    except BaseException as err:
        rt = trainer.rt
        err.add_note(f"(rank {rt.rank} of {rt.world_size}, pid {os.getpid()}, after step {trainer.step})")
        if trainer.tracker is not None:
            _record_failure(trainer, err)
        # An interruption or a non-finite loss stops every rank at the same step: they leave together.
        shutdown_runtime(failed=not isinstance(err, (TrainingInterrupted, NonFiniteLossError)))
        raise
    shutdown_runtime()
    if trainer.rt.is_main:
        (Path(cfg.output_dir) / "result.json").write_text(json.dumps(result.__dict__, indent=2))
    return result


def _record_failure(trainer: Trainer, err: BaseException) -> None:
    """The reason in train.log, the log in the MLflow run, and the run's status (rank 0)."""
    if not isinstance(err, TrainingInterrupted):  # that one has said where its checkpoint is
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        logger.error("stopped after step %d: %s", trainer.step, reason)
    try:
        trainer.upload_run_log()
    except Exception as upload_err:  # a tracker gone meanwhile must not hide why training stopped
        logger.warning("could not log %s to MLflow: %s", RUN_LOG, upload_err)
    # A NonFiniteLossError has already marked the run FAILED with the reason.
    if not isinstance(err, NonFiniteLossError):
        trainer.tracker.end("KILLED" if isinstance(err, (KeyboardInterrupt, TrainingInterrupted)) else "FAILED")
