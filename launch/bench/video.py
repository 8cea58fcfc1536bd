"""`foundry bench video`: clip prep throughput per codec, then decode throughput per decoder (PyAV,
DALI's CPU backend where it decodes the codec) on those shards, on the packaged sample videos."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from webdataset.tariterators import tarfile_samples

from ssl_foundry.data_prep.sample_videos import copy_sample_videos
from ssl_foundry.data_prep.shard_format import CLIP_CODECS, shard_paths
from ssl_foundry.data_prep.video import ClipSettings, prep_video
from ssl_foundry.launch.bench.report import machine, write_report
from ssl_foundry.pipeline.data.video import clip_bytes, clip_decoder


def bench_video(args: argparse.Namespace) -> int:
    """Clip prep throughput per codec, then decode throughput per decoder on those shards (clips/s
    and frames/s, one process), on the packaged sample videos (or --source)."""
    work = Path(tempfile.mkdtemp(prefix="bench-video-"))
    try:
        source = Path(args.source) if args.source else work / "src"
        if not args.source:
            copy_sample_videos(source)
        rows = []
        for codec in args.codecs:
            settings = ClipSettings(clip_frames=args.clip_frames, stride=args.stride, fps=args.fps,
                                    max_side=args.max_side, codec=codec)
            out = work / codec
            prep = prep_video(source, out, settings, shard_size=50, workers=args.workers)
            clips = [clip_bytes(s) for s in tarfile_samples([{"url": p} for p in shard_paths(out)])]
            row = {"codec": codec, "clips": prep["samples"], "videos": prep["videos"],
                   "prep_check_s": prep["check_seconds"], "prep_write_s": prep["write_seconds"],
                   "prep_clips_per_s": prep["samples"] / prep["write_seconds"],
                   "mib_per_clip": prep["bytes"] / prep["samples"] / 2**20, "decode": {}}
            decoders = ["pyav"] + (["dali"] if CLIP_CODECS[codec].dali_cpu else [])
            for name in decoders:
                decode = clip_decoder(name, args.batch_size)
                decode(clips[:args.batch_size])  # warm-up: DALI's first run allocates
                tic = time.perf_counter()
                frames = sum(c.shape[0] for i in range(0, len(clips), args.batch_size)
                             for c in decode(clips[i:i + args.batch_size]))
                seconds = time.perf_counter() - tic
                row["decode"][name] = {"clips_per_s": len(clips) / seconds, "frames_per_s": frames / seconds}
            print(f"[bench video] {codec}: prep {row['prep_clips_per_s']:.1f} clips/s, "
                  f"{row['mib_per_clip']:.3f} MiB/clip, decode " + ", ".join(
                      f"{k} {v['clips_per_s']:.0f} clips/s" for k, v in row["decode"].items()), flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "video", "clip_frames": args.clip_frames, "fps": args.fps, "stride": args.stride,
              "max_side": args.max_side, "prep_workers": args.workers, "decode_batch": args.batch_size,
              "source": args.source or "packaged sample videos (foundry prep sample-videos)",
              "codecs": rows, "machine": machine()}
    write_report(report, args.out)
    return 0
