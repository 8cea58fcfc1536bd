"""`foundry bench scaling`: weak scaling across hosts made of Linux network namespaces (root):
the same per-rank batch on 1, 2, 4 ... ranks, real TCP between the hosts; images/s, step time and
the time spent in collectives per step."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, schedule

from ssl_foundry.launch.bench.report import machine, write_report
from ssl_foundry.launch.local import launch_ranks
from ssl_foundry.launch.netns import NamespaceNetwork, can_make_namespaces
from ssl_foundry.pipeline.config import config_from_dict, load_config, to_dict
from ssl_foundry.pipeline.train.trainer import Trainer, gather_objects

REPO = Path(__file__).resolve().parents[2]
SCALING_PORT = 29450  # the rendezvous port on the first namespace host (the network is this bench's own)


def _collective_seconds(profiler) -> float:
    """Seconds the profiled steps spent in collectives: gloo's ops from start to completion (waiting
    for the other ranks included; DDP's bucket all-reduces overlap the backward pass), NCCL's kernels."""
    return sum(e.cpu_time_total if e.name.startswith("gloo:") else e.device_time_total
               for e in profiler.events() if e.name.startswith("gloo:") or "nccl" in e.name.lower()) / 1e6


def _scaling_rank(config: dict, warmup: int, steps: int, out: str) -> None:
    """One rank of a scaling case: train ``warmup + steps`` steps, profile the last ``steps``; at
    the last step the ranks gather their step times and collective seconds, and rank 0 writes them."""
    trainer = Trainer(config_from_dict(config))
    measured: dict[str, float] = {}

    def window_done(profiler) -> None:  # the profiled steps are over
        times = [wait + compute for wait, compute in trainer.step_times[warmup:]]
        measured.update(step_time_s=statistics.median(times),
                        collective_s_per_step=_collective_seconds(profiler) / steps)

    def report(step: int) -> None:
        if step < warmup + steps:
            return
        ranks = gather_objects(measured, trainer.rt)
        if trainer.rt.is_main:
            Path(out).write_text(json.dumps({key: [r[key] for r in ranks] for key in measured}))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.rt.device.type == "cuda" else [])
    profiler = profile(activities=activities, on_trace_ready=window_done,
                       schedule=schedule(wait=max(0, warmup - 1), warmup=1, active=steps))
    trainer.step_callbacks += [lambda step: profiler.step(), report]
    with profiler:
        trainer.train()


def _scaling_node(args: argparse.Namespace) -> int:
    """This process is one node of a scaling case (`--node-of FILE`): its ranks; rank 0 writes FILE."""
    cfg = load_config(args.config, args.overrides)
    launch_ranks(cfg, _scaling_rank, to_dict(cfg), args.warmup, args.steps, args.node_of)
    return 0


def bench_scaling(args: argparse.Namespace) -> int:
    """Weak scaling across hosts: the same per-rank batch on 1, 2, 4 ... ranks spread over
    ``--hosts`` Linux network namespaces (real TCP between them; root only), each host running the
    per-node command: images/s, step time and the time spent in collectives per step, and the
    efficiency images/s(N) / (N x images/s(1))."""
    if args.node_of:
        return _scaling_node(args)
    reason = can_make_namespaces()
    if reason:
        print(f"foundry bench scaling: {reason}", file=sys.stderr)
        return 2
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with NamespaceNetwork(args.hosts) as network:
        for ranks in args.ranks:
            nodes = min(ranks, args.hosts)
            if ranks % nodes:
                raise SystemExit(f"--ranks {ranks} does not split evenly over {nodes} hosts")
            case = [*args.overrides, f"output_dir={out / f'ranks{ranks}'}",
                    f"train.batch_size={args.batch_per_rank * ranks}", f"train.max_steps={args.warmup + args.steps}",
                    "train.resume=never", "launch.max_restarts=0", f"train.checkpoint_every={10**9}",
                    "eval.after_pretrain=false", "eval.knn_every=0", "mlflow.registered_model=",
                    f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
                    f"launch.nnodes={nodes}", f"launch.nproc_per_node={ranks // nodes}",
                    f"launch.rdzv_endpoint={network.hosts[0].address}:{SCALING_PORT + ranks}"]
            result = out / f"ranks{ranks}.json"
            result.unlink(missing_ok=True)
            command = [sys.executable, "-m", "ssl_foundry.launch", "bench", "scaling", args.config, *case,
                       "--node-of", str(result), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            log_path = out / f"ranks{ranks}.log"
            print(f"[bench scaling] {ranks} rank(s): {nodes} host(s) x {ranks // nodes}, log {log_path}", flush=True)
            with open(log_path, "w") as log:
                procs = [subprocess.Popen(host.command(command), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
                         for host in network.hosts[:nodes]]
                codes = [proc.wait() for proc in procs]
            row = {"ranks": ranks, "hosts": nodes, "ranks_per_host": ranks // nodes,
                   "global_batch": args.batch_per_rank * ranks}
            if any(codes) or not result.is_file():
                row["error"] = f"exit codes {codes}; see {log_path}"
            else:
                per_rank = json.loads(result.read_text())
                step_s = max(per_rank["step_time_s"])  # the ranks step in lock-step: the slowest sets the pace
                row.update(step_time_s=step_s, images_per_s=row["global_batch"] / step_s,
                           collective_s_per_step=statistics.mean(per_rank["collective_s_per_step"]),
                           collective_s_per_step_by_rank=per_rank["collective_s_per_step"])
            rows.append(row)
            print(f"[bench scaling] {json.dumps(row)}", flush=True)
    single = next((r for r in rows if r["ranks"] == 1 and "images_per_s" in r), None)
    for row in rows:
        if single and "images_per_s" in row:
            row["weak_scaling_efficiency"] = row["images_per_s"] / (row["ranks"] * single["images_per_s"])
    cfg = load_config(args.config, args.overrides)
    report = {"benchmark": "scaling", "command": " ".join(["foundry bench scaling", args.config, *args.overrides]),
              "method": cfg.model.method, "backbone": cfg.model.backbone, "batch_per_rank": args.batch_per_rank,
              "steps_measured": args.steps, "warmup_steps": args.warmup, "hosts": args.hosts,
              "network": "Linux network namespaces on one machine, veth pairs on a bridge (all hosts share its CPUs)",
              "cases": rows, "machine": machine()}
    write_report(report, str(out / "scaling.json"))
    return 1 if any("error" in r for r in rows) else 0
