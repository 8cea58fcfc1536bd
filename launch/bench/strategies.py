"""`foundry bench strategies`: the same short run under DDP and each ZeRO stage (and offload), on
``--nproc`` ranks: steady step time, images/s and every rank's memory, beside the model-state
memory ZeRO's arithmetic predicts."""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient

from ssl_foundry.launch.bench import STRATEGY_CASES
from ssl_foundry.launch.bench.report import machine, write_report
from ssl_foundry.launch.bench.runs import pretrain_process
from ssl_foundry.pipeline.config import load_config
from ssl_foundry.pipeline.train.trainer import build_model

OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4, "lars": 4}  # fp32 moments per trained parameter


def model_state_mb_per_rank(case: str, trained: int, frozen: int, optimizer: str, ranks: int) -> float:
    """ZeRO's accounting (Rajbhandari et al. 2020, sec. 3) for fp32 master weights as trained here:
    parameters 4 B + gradients 4 B + optimizer moments K B per trained parameter, 4 B per frozen
    one (momentum target). Stage 1 shards the moments, 2 also the gradients, 3 also the parameters;
    offloaded shards live in CPU memory instead (on a CPU machine: the same memory)."""
    k = OPTIMIZER_STATE_BYTES[optimizer]
    params, grads, moments = 4 * (trained + frozen), 4 * trained, k * trained
    stage = 0 if case == "ddp" else int(case[4])
    per_rank = (params / (ranks if stage >= 3 else 1) + grads / (ranks if stage >= 2 else 1)
                + moments / (ranks if stage >= 1 else 1))
    return per_rank / 2**20


def _drop_checkpoints(run_dir: Path, result: dict) -> None:
    """A benchmark keeps numbers, not weights: the run's checkpoints and their MLflow copy (GBs
    per case for a ViT-B with Adam) are deleted once its result is read."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    artifact_uri = MlflowClient(tracking_uri=result["tracking_uri"]).get_run(result["run_id"]).info.artifact_uri
    if urlparse(artifact_uri).scheme in ("", "file"):
        shutil.rmtree(Path(urlparse(artifact_uri).path) / "checkpoints", ignore_errors=True)


def bench_strategies(args: argparse.Namespace) -> int:
    """The same short run under DDP and each ZeRO stage (and offload), ``--nproc`` ranks: steady
    step time, images/s and each rank's memory after training (RSS now and peak; GPU memory on a
    GPU), beside the model-state memory ZeRO predicts."""
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [f"launch.nproc_per_node={args.nproc}", f"train.max_steps={args.steps}", "train.resume=never",
              "eval.after_pretrain=false", f"train.checkpoint_every={10**6}", "mlflow.registered_model=",
              f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}", *args.overrides]
    def case_overrides(case: str) -> list[str]:  # deepspeed.* overrides are for the DeepSpeed cases only
        kept = [o for o in common if case != "ddp" or not o.startswith("deepspeed.")]
        return [*kept, *STRATEGY_CASES[case]]

    cfg = load_config(args.config, case_overrides(args.cases[0]))
    model = build_model(cfg)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    del model
    rows = []
    for case in args.cases:
        run_dir, log_path = out / case, out / f"{case}.log"
        print(f"[bench strategies] {case}: {args.steps} steps on {args.nproc} ranks, log {log_path}", flush=True)
        done = pretrain_process(args.config, [*case_overrides(case), f"output_dir={run_dir}"], log_path)
        row = {"case": case, "overrides": STRATEGY_CASES[case],
               "model_state_mb_per_rank": model_state_mb_per_rank(case, trained, frozen, cfg.train.optimizer,
                                                                   args.nproc)}
        result_path = run_dir / "result.json"
        if done.returncode != 0 or not result_path.is_file():
            row["error"] = f"exit {done.returncode}; see {log_path}"
        else:
            result = json.loads(result_path.read_text())
            _drop_checkpoints(run_dir, result)
            row.update(step_time_s=result["timing"]["steady_step_time_s"],
                       images_per_s=result["timing"]["steady_images_per_s"],
                       **{f"{key}_mb_per_rank": values for key, values in result["memory_mb"].items()})
        rows.append(row)
        print(f"[bench strategies] {json.dumps(row)}", flush=True)
    report = {"benchmark": "strategies", "command": " ".join(["foundry bench strategies", args.config,
                                                             *args.overrides]),
              "ranks": args.nproc, "steps": args.steps, "method": cfg.model.method, "backbone": cfg.model.backbone,
              "trained_params": trained, "frozen_params": frozen, "optimizer": cfg.train.optimizer,
              "global_batch": cfg.train.batch_size, "cases": rows, "machine": machine(),
              "torch_threads_per_rank": max(1, (os.cpu_count() or 1) // args.nproc)}
    write_report(report, str(out / "strategies.json"))
    return 1 if any("error" in r for r in rows) else 0
