"""`foundry submit`: pretraining as a Slurm job through submitit, with preemption that loses nothing.

    foundry submit CONFIG [key=value ...] [--sweep train.lr=0.1,0.3 ...] [--wait]

One Slurm task per rank (per GPU with ``launch.gpus_per_node``), ``launch.nodes`` nodes; each task
exports the torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and runs
``pipeline.train.run.run_pretraining``, as a local run does (online kNN monitor, plots, gate, model
card). A sweep is one Slurm job array: one array task per combination of the ``--sweep`` values, each
in its own ``<output_dir>/<index>-<override>`` with its override logged to MLflow as the param
``sweep.override``.

Preemption and time limits: Slurm sends USR2 ``launch.signal_delay_s`` before the time limit (and
``job._interrupt()``/``scancel --signal USR2`` does on demand). Every rank then finishes its step,
they all write one checkpoint together, and rank 0 hands over to submitit, which calls
``PretrainJob.checkpoint`` (the same job with ``train.resume=auto``) and requeues the job. The
requeued job resumes from that checkpoint exactly and keeps logging to the same MLflow run (the run
id is in the checkpoint). A job killed without warning and requeued by Slurm resumes from its last
periodic checkpoint (``train.checkpoint_every``) the same way.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import DelayedSubmission, TorchDistributedEnvironment

from ssl_foundry.data_prep.shard_format import is_remote, redact
from ssl_foundry.launch.commands import print_summary
from ssl_foundry.pipeline.config import (Config, ConfigError, config_from_dict, load_config, slurm_time_minutes,
                                         tasks_per_node, to_dict)
from ssl_foundry.pipeline.data.loader import validate_batch
from ssl_foundry.pipeline.registry.tracking import resolve_tracking_uri
from ssl_foundry.pipeline.train.run import run_pretraining
from ssl_foundry.pipeline.train.run_dir import plan_run
from ssl_foundry.pipeline.train.trainer import TrainingInterrupted

REPO_ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- sweeps


def _split_values(text: str) -> list[str]:
    """``0.1,0.3`` -> ["0.1", "0.3"]; commas inside [...] or {...} stay (``[0.2,1.0],[0.5,1.0]``)."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    values.append(current)
    return [v.strip() for v in values]


def parse_sweeps(specs: list[str]) -> list[list[str]]:
    """``["train.lr=0.1,0.3", "train.seed=0,1"]`` -> the 4 combinations as override lists."""
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--sweep '{spec}' is not key=v1,v2,... (e.g. --sweep train.lr=0.1,0.3)")
        key, raw = spec.split("=", 1)
        values = _split_values(raw)
        if not key.strip() or not all(values):
            raise ConfigError(f"--sweep '{spec}': needs a key and non-empty values, e.g. train.lr=0.1,0.3")
        axes.append([f"{key.strip()}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def _slug(overrides: list[str]) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", "_".join(overrides))[:80]


# --------------------------------------------------------------------------- inside the job


def resolve_master_addr(host: str) -> str:
    """An address the other ranks can reach for ``host`` (the job's first node): the name itself
    if it resolves, else the NodeAddr Slurm uses for it (``scontrol show node``), since node names
    need not be DNS names (the local cluster's n1, n2 are not). FOUNDRY_MASTER_ADDR overrides."""
    if os.environ.get("FOUNDRY_MASTER_ADDR"):
        return os.environ["FOUNDRY_MASTER_ADDR"]
    try:
        socket.getaddrinfo(host, None)
        return host
    except socket.gaierror:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host, "--oneliner"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"\bNodeAddr=(\S+)", out)
    if not match:
        raise RuntimeError(f"master node '{host}' does not resolve and Slurm knows no NodeAddr for it; "
                           f"set FOUNDRY_MASTER_ADDR to an address of that node")
    return match.group(1)


# Rank 0 listens on a port every node derives from the job id alone. Outgoing connections take
# their local port at random from the kernel's ephemeral range (Linux: 32768-60999), so a port in
# that range can be taken on the master node by any client at the wrong moment; below it, only a
# listening service can hold one. slurm/pretrain.sbatch derives its rendezvous port the same way.
MASTER_PORT_BASE, MASTER_PORT_SPAN = 20000, 12768


def master_port(job_id: str | int) -> int:
    """The job's rendezvous port: the same on every node and after a requeue, different for the
    tasks of a job array (each has its own SLURM_JOB_ID), below the ephemeral range."""
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def export_torch_distributed_env() -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT from Slurm's variables
    (submitit's TorchDistributedEnvironment). MASTER_PORT is ``master_port(SLURM_JOB_ID)`` unless the
    job's environment sets it. All GPUs of the node stay visible: the runtime picks cuda:LOCAL_RANK."""
    os.environ.setdefault("MASTER_PORT", str(master_port(os.environ["SLURM_JOB_ID"])))
    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    os.environ["MASTER_ADDR"] = resolve_master_addr(env.master_addr)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {k: os.environ[k] for k in keys}


class _StopOnSignal:
    """Takes over submitit's preemption/time-limit signal (USR2 by default) in a training task.

    submitit's own handler would checkpoint and requeue from inside the signal handler, on rank 0
    alone, wherever the step happens to be. Instead the signal only sets a flag; the trainer polls it
    after each step (``Trainer.stop_check``), all ranks agree, write one checkpoint together and
    raise ``TrainingInterrupted``; then ``hand_over`` gives the signal to submitit's handler on
    rank 0 (calls ``PretrainJob.checkpoint``, dumps it, ``scontrol requeue``, exits)."""

    def __init__(self) -> None:
        self.signum = submitit.JobEnvironment._usr_sig()
        self.requested = False
        self.submitit_handler = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested

    def hand_over(self, rank: int) -> None:
        if rank == 0 and callable(self.submitit_handler):
            self.submitit_handler(self.signum, None)  # requeues and exits (or raises when it cannot)
        # Other ranks: their part is checkpointed; they write no result. Exit status 0, since srun's
        # --kill-on-bad-exit would end rank 0 on a failure status before it has requeued the job.
        sys.exit(0)


class PretrainJob:
    """The callable submitit runs in every task. Checkpointable: submitit calls ``checkpoint`` on
    the preemption / time-limit signal and requeues what it returns."""

    def __init__(self, config: dict[str, Any], params: dict[str, str] | None = None):
        self.config = config
        self.params = params or {}

    def __call__(self):
        dist_env = export_torch_distributed_env()
        rank = int(dist_env["RANK"])
        stop = _StopOnSignal()
        job_tags = {"slurm.job_id": os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID", "")),
                    "slurm.array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID", ""),
                    "slurm.restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
                    "slurm.nodelist": os.environ.get("SLURM_JOB_NODELIST", "")}

        def setup(trainer) -> None:
            trainer.stop_check = stop.is_set
            if trainer.tracker is not None:
                if self.params:
                    trainer.tracker.log_params(self.params)
                trainer.tracker.set_tags({k: v for k, v in job_tags.items() if v})
            if rank == 0:
                logger.info("rank 0 of %s, master %s:%s, MLflow run %s", dist_env["WORLD_SIZE"],
                            dist_env["MASTER_ADDR"], dist_env["MASTER_PORT"], trainer.run_id)

        try:
            return run_pretraining(config_from_dict(self.config), setup=setup)
        except TrainingInterrupted as err:
            if rank == 0:
                logger.info("interrupted at step %d: requeueing (resumes from %s)", err.step, err.checkpoint)
            stop.hand_over(rank)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any):
        """What submitit requeues: the same job, resuming from the newest checkpoint of output_dir."""
        config = copy.deepcopy(self.config)
        config["train"]["resume"] = "auto"
        return DelayedSubmission(PretrainJob(config, self.params))

    __submitit_checkpoint__ = checkpoint


# --------------------------------------------------------------------------- submission


def make_executor(cfg: Config, folder: Path):
    """submitit's AutoExecutor on Slurm with the launch.* keys as sbatch options."""
    launch = cfg.launch
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=launch.max_requeues)
    except RuntimeError as err:  # no srun on PATH
        raise ConfigError(
            f"foundry submit needs Slurm's sbatch/srun on PATH ({err}). For a local test cluster run "
            f"`sudo slurm/local-cluster/start.sh` (Debian, root), then `export SLURM_CONF=...` as it prints") from None
    params: dict[str, Any] = {
        "name": launch.job_name or f"foundry-{cfg.model.method}",
        "nodes": launch.nodes,
        "tasks_per_node": tasks_per_node(cfg),
        "timeout_min": slurm_time_minutes(launch.time),
        "slurm_signal_delay_s": launch.signal_delay_s,
        # A rank that fails ends the step: the others would otherwise wait for it until the time limit.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
        # The job imports this checkout (launch.slurm, pipeline ...), whatever is installed.
        "slurm_setup": [f"export PYTHONPATH={REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}", *launch.setup],
    }
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.cpus_per_task:
        params["cpus_per_task"] = launch.cpus_per_task
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[f"slurm_{key}"] = getattr(launch, key)
    extra = dict(launch.sbatch_args)
    if launch.mem:
        extra["mem"] = launch.mem
    if extra:
        params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def _absolute(cfg: Config) -> Config:
    """Local paths as absolute ones, and the MLflow store resolved here (the config key, else the
    submitting shell's MLFLOW_TRACKING_URI, else ./runs/mlflow.db): the job may start in another
    directory (and on other nodes), with another environment."""
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(Path(cfg.output_dir).absolute())
    cfg.mlflow.tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    for key in ("train", "eval_train", "eval_test"):
        value = getattr(cfg.data, key)
        if value and not is_remote(value):
            setattr(cfg.data, key, str(Path(value).absolute()))
    return cfg


def _load_job_config(config_path: str | None, overrides: list[str]) -> Config:
    """The job's config, validated with its batch split over the ranks it asks Slurm for."""
    cfg = load_config(config_path, overrides)
    validate_batch(cfg, launcher="slurm")
    return _absolute(cfg)


def submit(config_path: str | None, overrides: list[str] = (), sweeps: list[str] = ()):
    """Validate and submit; returns ``(jobs, configs, folder)``: one job, or one per sweep combination
    (a Slurm job array)."""
    overrides = list(overrides)
    base = _load_job_config(config_path, overrides)
    folder = Path(base.launch.submit_dir or Path(base.output_dir) / "slurm").absolute()
    combos = parse_sweeps(list(sweeps))
    executor = make_executor(base, folder)
    if not combos:
        plan_run(base)  # a changed config on another run's output_dir: refused before it queues
        jobs = [executor.submit(PretrainJob(to_dict(base)))]
        return jobs, [base], folder
    configs, callables = [], []
    for index, combo in enumerate(combos):
        cfg = _load_job_config(config_path, overrides + combo)
        cfg.output_dir = str(Path(base.output_dir) / f"{index:02d}-{_slug(combo)}")
        swept = redact(" ".join(combo))  # a data location's credentials stay out of MLflow
        if not cfg.mlflow.run_name:
            cfg.mlflow.run_name = swept
        plan_run(cfg)
        configs.append(cfg)
        callables.append(PretrainJob(to_dict(cfg), {"sweep.override": swept, "sweep.index": str(index)}))
    jobs = executor.submit_array(callables)
    return jobs, configs, folder


def task_result(job):
    """Rank 0's TrainResult of a finished job (waits for it)."""
    return job.results()[0]


def describe(jobs, configs, folder: Path) -> str:
    cfg = configs[0]
    first = jobs[0].job_id
    main_id = str(first).split("_")[0]
    n_tasks = cfg.launch.nodes * tasks_per_node(cfg)
    lines = [f"submitted Slurm job {main_id}" + (f" (array of {len(jobs)})" if len(jobs) > 1 else "")
             + f": {cfg.launch.nodes} node(s) x {tasks_per_node(cfg)} task(s) = {n_tasks} rank(s), "
             f"partition {cfg.launch.partition or '(default)'}, time limit {slurm_time_minutes(cfg.launch.time)} min"]
    for job, c in zip(jobs, configs):
        run_name = f" ({c.mlflow.run_name})" if len(jobs) > 1 else ""
        lines.append(f"  job {job.job_id}{run_name}: output {c.output_dir}")
        lines.append(f"      log {Path(c.output_dir) / 'train.log'} (rank 0's lines; each rank's output in "
                     f"{folder / f'{job.job_id}_N_log.err'}, results in .out)")
    lines += [
        f"MLflow: {cfg.mlflow.tracking_uri}, experiment '{cfg.mlflow.experiment}', runs tagged slurm.job_id={main_id}",
        f"follow: tail -F {Path(configs[0].output_dir) / 'train.log'}",
        f"        squeue -j {main_id}; sacct -j {main_id} -o JobID,State,Elapsed,NodeList",
        f"cancel: scancel {main_id}     preempt (checkpoint + requeue): scancel --signal USR2 {main_id}",
    ]
    return "\n".join(lines)


def submit_command(args: argparse.Namespace) -> int:
    jobs, configs, folder = submit(args.config, args.overrides, args.sweep or [])
    print(describe(jobs, configs, folder), flush=True)
    if not args.wait:
        return 0
    status = 0
    for job, cfg in zip(jobs, configs):
        try:
            result = task_result(job)
        except Exception as err:  # submitit raises the job's traceback
            print(f"job {job.job_id} failed: {err}", file=sys.stderr)
            status = 1
            continue
        print(f"\njob {job.job_id} ({job.state}):", end="")
        print_summary(result, cfg)
    return status

