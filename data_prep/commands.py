"""`foundry prep images SRC OUT`, `foundry prep video SRC OUT`, `foundry prep fashion-mnist OUT`,
`foundry prep photos OUT`, `foundry prep sample-videos OUT`: make shard folders (each shard with its
DALI index; OUT may be s3://bucket/prefix); `foundry prep index DIR`: (re)index one; `foundry prep
manifest LOCATION`: describe WebDataset shards made elsewhere. Each function here runs one of them
and returns its exit code; their arguments are declared in launch/cli.py."""
from __future__ import annotations

import argparse
import sys

from ssl_foundry.data_prep.existing_shards import describe_shards
from ssl_foundry.data_prep.fashion_mnist import prep_fashion_mnist
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.photos import write_photo_folder
from ssl_foundry.data_prep.sample_videos import copy_sample_videos
from ssl_foundry.data_prep.shard_format import ManifestError, PrepError
from ssl_foundry.data_prep.shards import reindex


def run_images(args: argparse.Namespace) -> int:
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


def run_video(args: argparse.Namespace) -> int:
    from ssl_foundry.data_prep.video import ClipSettings, prep_video  # PyAV (optional): only this command needs it

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


def run_sample_videos(args: argparse.Namespace) -> int:
    try:
        copied = copy_sample_videos(args.out)
    except PrepError as err:
        print(f"foundry prep sample-videos: {err}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(copied)} videos ({', '.join(p.name for p in copied)})")
    return 0


def run_fashion_mnist(args: argparse.Namespace) -> int:
    try:
        summaries = prep_fashion_mnist(args.out, shard_size=args.shard_size, workers=args.workers,
                                       limit=args.limit, overwrite=args.overwrite)
    except PrepError as err:
        print(f"foundry prep fashion-mnist: {err}", file=sys.stderr)
        return 1
    for summary in summaries.values():
        _report(summary)
    return 0


def run_photos(args: argparse.Namespace) -> int:
    try:
        write_photo_folder(f"{args.out}/images", short_side=args.short_side)
        summary = prep_images(f"{args.out}/images", f"{args.out}/shards", shard_size=args.shard_size,
                              workers=args.workers, overwrite=args.overwrite)
    except PrepError as err:
        print(f"foundry prep photos: {err}", file=sys.stderr)
        return 1
    _report(summary)
    return 0


def run_index(args: argparse.Namespace) -> int:
    try:
        summary = reindex(args.folder, verify=args.verify, workers=args.workers)
    except (ManifestError, PrepError) as err:
        print(f"foundry prep index: {err}", file=sys.stderr)
        return 1
    print(f"{summary['out']}: {summary['indexed']} samples indexed in {summary['shards']} shards, "
          f"{summary['skipped']} left out (images that do not decode: see index_skipped in the manifest)")
    return 0


def run_manifest(args: argparse.Namespace) -> int:
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
