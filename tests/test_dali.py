"""The DALI loader (``data.backend=dali``) on DALI's CPU backend over real photos (scikit-image's
and OpenCV's, sharded by ``foundry prep``): the views of every recipe, parity with the torchvision
backend compiling the same spec, sharding over ranks, corrupt images, resume, and a real pretrain.

Parity tolerances are statistical: each compares a statistic of the two backends (or of one
backend and its nominal value) within 4 standard errors estimated from the samples themselves,
plus a stated allowance where the backends differ by design (see pipeline.data.augment.dali_backend:
colour jitter in a fixed order, DALI's linear-YIQ hue rotation)."""
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.tariterators import tarfile_samples

from augment_parity import (FLIP, MEAN, MULTI_CROP, PARITY_RECIPE, SEED, STD, coordinate_probe, crop_geometry,
                            epochs_of_views, rrc, take, to_pixels, torch_stream, views, within)
from conftest import REPO, run_cli, write_recipe
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.data_prep.shard_format import ManifestError, read_manifest, shard_paths
from ssl_foundry.pipeline.config import ConfigError, DataConfig, load_config
from ssl_foundry.pipeline.data.augment import parity, spec
from ssl_foundry.pipeline.data.augment.dali_backend import DALI_OPS
from ssl_foundry.pipeline.data.augment.torch_backend import TORCH_OPS, MultiViewTransform
from ssl_foundry.pipeline.data.dali_loader import DaliStream
from ssl_foundry.pipeline.data.loader import make_loader
from ssl_foundry.pipeline.data.position import LoaderPosition

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def dali_stream(folder, view_specs, batch_size, mean=MEAN, std=STD, **kwargs) -> DaliStream:
    kwargs = {"num_threads": 2, "seed": SEED, "shuffle_buffer": 16, **kwargs}
    return DaliStream(str(folder), view_specs, mean, std, batch_size, **kwargs)


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def tar_labels(folder) -> dict[str, int]:
    return {s["__key__"]: int(s["cls"]) for s in tarfile_samples([{"url": p} for p in shard_paths(folder)])}


# ----------------------------------------------------------------------------- the spec


def test_both_backends_implement_exactly_the_spec_ops():
    assert set(TORCH_OPS) == set(DALI_OPS) == set(spec.SPEC_OPS)


def test_an_op_a_backend_lacks_is_a_build_time_error_naming_op_and_backend():
    recipe = views((2, [rrc(32), {"op": "solarize", "p": 0.2}]))
    without_solarize = {name: op for name, op in DALI_OPS.items() if name != "solarize"}
    with pytest.raises(ConfigError, match="op 'solarize' is not available on the dali backend"):
        spec.compile_views(recipe, "dali", without_solarize)


@pytest.mark.parametrize("override,match", [
    ("data.views=[{count: 2, ops: [{op: jitter}]}]", "unknown augmentation op 'jitter'"),
    ("data.views=[{count: 2, ops: [{op: gaussian_blur, args: {kernel_size: 4}}]}]",
     "'gaussian_blur': bad args .*kernel_size must be odd"),
    ("data.views=[{count: 2, ops: [{op: resize, args: {sise: 32}}]}]", "'resize': bad args.*Its args: size"),
    ("data.readers=4", "data.readers=4 is a feature of the torch loader"),
])
def test_recipe_errors_are_config_errors(override, match):
    recipe = next(p for p in CONFIGS if p.stem == "simclr_resnet18_fmnist")
    with pytest.raises(ConfigError, match=match):
        load_config(recipe, ["data.backend=dali", override], check_paths=False)


# ----------------------------------------------------------------------------- views

RECIPES = {p.stem: load_config(p, check_paths=False).data for p in CONFIGS}
RECIPES["multi_crop"] = DataConfig(views=MULTI_CROP, mean=MEAN, std=STD)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_view_of_every_recipe(photos, name):
    """Shapes (the torch backend's for the same recipe), dtype, device, and values that are
    normalised images: back in [0, 1] after undoing (x - mean) / std, and not constant."""
    data = RECIPES[name]
    (batch,) = take(dali_stream(photos, data.views, 4, data.mean, data.std), 1)
    expected = MultiViewTransform(data.views, data.mean, data.std)(torch.zeros(3, 256, 300, dtype=torch.uint8))
    assert [tuple(v.shape) for v in batch["views"]] == [(4, *e.shape) for e in expected]
    for view in batch["views"]:
        assert view.dtype == torch.float32 and view.device.type == "cpu"
        pixels = to_pixels(view, data.mean, data.std)
        assert pixels.min() >= -0.01 and pixels.max() <= 255.01
        assert pixels.std() > 5.0
    assert batch["label"].dtype == torch.long and set(batch["label"].tolist()) <= {0, 1}


def test_deterministic_view_matches_torchvision_pixel_for_pixel(photos):
    """Decode + resize (non-square: (h, w) order) + normalise, no randomness: the same photo
    gives the same view up to the two resamplers' rounding."""
    resize = views((1, [{"op": "resize", "args": {"size": [96, 128]}}]))
    by_key = {}
    for batch in take(dali_stream(photos, resize, 8, shuffle_buffer=0), 5):
        by_key.update(zip(batch["key"], batch["views"][0]))
    assert len(by_key) == 40
    diffs = []
    for batch in make_loader(torch_stream(photos, resize, 8, finite=True)):
        for key, view in zip(batch["key"], batch["views"][0]):
            diffs.append((to_pixels(by_key[key]) - to_pixels(view)).abs())
    diffs = torch.stack(diffs)
    assert diffs.mean() < 1.0  # in 0..255 units
    assert torch.quantile(diffs.flatten()[::7], 0.99) < 6


def test_each_dali_op_equals_torchvision_on_a_photo(photos):
    """Every colour / filter op of the DALI backend with its random parameter fixed, against
    torchvision's functional op on a real photo: equal up to rounding (DALI rounds to uint8 where
    torchvision truncates). Covers what is written here rather than taken from DALI: contrast
    around the mean grey, the HSV hue shift, grayscale, solarize."""
    import torchvision.transforms.v2.functional as F
    from nvidia.dali import fn, pipeline_def

    from ssl_foundry.pipeline.data.augment import dali_backend as ops

    photo = np.array(Image.open(photos.parent / "images" / "opencv" / "fruits.jpg").convert("RGB"))
    cases = {  # name: (DALI graph on HWC uint8, torchvision on CHW uint8)
        "brightness 1.3": (lambda x: fn.brightness_contrast(x, brightness=1.3), lambda t: F.adjust_brightness(t, 1.3)),
        "contrast 0.6": (lambda x: ops._contrast(x, 0.6), lambda t: F.adjust_contrast(t, 0.6)),
        "saturation 0.5": (lambda x: fn.hsv(x, saturation=0.5), lambda t: F.adjust_saturation(t, 0.5)),
        "hue +0.1": (lambda x: ops._hue(x, 0.1), lambda t: F.adjust_hue(t, 0.1)),
        "hue -0.3": (lambda x: ops._hue(x, -0.3), lambda t: F.adjust_hue(t, -0.3)),
        "grayscale": (lambda x: ops._grayscale(x, spec.Grayscale()), lambda t: F.rgb_to_grayscale(t, 3)),
        "solarize 128": (lambda x: ops._solarize(x, spec.Solarize(128)), lambda t: F.solarize(t, 128)),
        "blur 9, sigma 1.5": (lambda x: ops._gaussian_blur(x, spec.GaussianBlur(9, (1.5, 1.5))),
                              lambda t: F.gaussian_blur(t, [9, 9], [1.5, 1.5])),
        "flip": (lambda x: ops._horizontal_flip(x, spec.HorizontalFlip()), F.horizontal_flip),
    }

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, enable_conditionals=True)
    def each_op():
        image = fn.external_source(source=lambda: [photo], batch=True, layout="HWC")
        return tuple(dali_op(image) for dali_op, _ in cases.values())

    pipe = each_op()
    pipe.build()
    tensor = torch.from_numpy(photo).permute(2, 0, 1)
    for name, out, (_, torch_op) in zip(cases, pipe.run(), cases.values()):
        got = torch.from_numpy(np.array(out.as_tensor())[0]).int()
        want = torch_op(tensor).permute(1, 2, 0).int()
        assert got.shape == want.shape, name
        assert (got - want).abs().max() <= 1, name


def test_statistics_of_the_same_spec_match_torchvision(photos, one_thread):
    """The full SimCLR/BYOL-style op chain on real photos, 12 epochs (960 views) per backend:
    per-channel mean and std of the outputs agree (0..255 units), and the grey rate is p=0.2 in both.
    Allowance: 2 grey levels, the bias of DALI rounding where torchvision truncates, over ~4 ops."""
    epochs = 12  # 40 photos, batches of 8: 5 per epoch; both backends see every photo 12 times
    d_keys, dali_views = epochs_of_views(dali_stream(photos, PARITY_RECIPE, 8, num_threads=1), 5 * epochs)
    t_keys, torch_views = epochs_of_views(torch_stream(photos, PARITY_RECIPE, 8), 5 * epochs)
    assert len(dali_views) == len(torch_views) == 2 * 40 * epochs
    for channel in range(3):
        d, t = dali_views[:, channel].flatten(1), torch_views[:, channel].flatten(1)
        assert parity.paired_within(d_keys, d.mean(1), t_keys, t.mean(1), parity.ROUNDING_ALLOWANCE), channel
        assert parity.paired_within(d_keys, d.std(1), t_keys, t.std(1), parity.ROUNDING_ALLOWANCE), channel
    for name, rendered in (("dali", dali_views), ("torch", torch_views)):
        grey = (rendered.amax(1) - rendered.amin(1)).flatten(1).amax(1) < 0.01
        rate, se = grey.float().mean(), (0.2 * 0.8 / len(grey)) ** 0.5
        assert abs(rate - 0.2) < 4 * se, (name, float(rate))


def test_crop_area_aspect_ratio_and_flip_rate_match_torchvision(tmp_path):
    coordinate_probe(tmp_path / "probe", 40)
    prep_images(tmp_path / "probe", tmp_path / "shards", shard_size=8, workers=1)
    recipe = views((2, [rrc(64), FLIP]))
    epochs = 5
    measured = {}
    for name, stream in (("dali", dali_stream(tmp_path / "shards", recipe, 8)),
                         ("torch", torch_stream(tmp_path / "shards", recipe, 8))):
        area, aspect, flipped = crop_geometry(epochs_of_views(stream, 5 * epochs)[1])
        measured[name] = area, aspect.log(), flipped.float()
        # the spec's ranges: area in [0.08, 1] of the image, w / h in [3/4, 4/3] (a few % of slack:
        # the window is measured from rounded pixels)
        assert area.min() > 0.08 * 0.95 and area.max() < 1.03, name
        assert aspect.min() > 0.75 * 0.96 and aspect.max() < 4 / 3 * 1.04, name
        rate, se = flipped.float().mean(), (0.25 / len(flipped)) ** 0.5
        assert abs(rate - 0.5) < 4 * se, (name, float(rate))
    (d_area, d_log_aspect, _), (t_area, t_log_aspect, _) = measured["dali"], measured["torch"]
    assert within(d_area, t_area)
    assert within(d_log_aspect, t_log_aspect)
    for d, t in ((d_area, t_area), (d_log_aspect, t_log_aspect)):  # spread too, not only the mean
        assert abs(d.std() - t.std()) < 0.2 * t.std()


# ----------------------------------------------------------------------------- reading


def test_two_ranks_see_every_sample_once_per_epoch(photos):
    """40 photos over 2 ranks in batches of 4: 5 steps an epoch, every photo once, with its label;
    the next epoch deals another order."""
    labels = tar_labels(photos)
    recipe = views((2, [rrc(32), FLIP]))
    per_epoch = {0: [], 1: []}
    for rank in range(2):
        stream = dali_stream(photos, recipe, 4, rank=rank, world_size=2)
        assert stream.steps_per_epoch() == 5
        batches = take(stream, 10)
        assert [(b["epoch"], b["batch"]) for b in batches] == [(e, i) for e in (0, 1) for i in range(5)]
        for b in batches:
            assert b["label"].tolist() == [labels[k] for k in b["key"]]
            per_epoch[b["epoch"]].append(b["key"])
    for epoch, groups in per_epoch.items():
        keys = [k for g in groups for k in g]
        assert sorted(keys) == sorted(labels), epoch
    assert per_epoch[0] != per_epoch[1]


def test_resumed_stream_continues_the_uninterrupted_one(photos):
    """Starting at (epoch, batch) skips that many batches of the epoch's seeded pipeline: the same
    keys and bitwise the same views as the uninterrupted stream (DALI CPU backend)."""
    recipe = views((2, [rrc(32), FLIP, {"op": "color_jitter", "p": 0.8, "args": {"brightness": 0.4}}]))
    reference = take(dali_stream(photos, recipe, 4, rank=1, world_size=2), 8)
    for start in (3, 5, 6):  # mid-epoch, at the epoch boundary, into epoch 1
        epoch, batch = divmod(start, 5)
        resumed = take(dali_stream(photos, recipe, 4, rank=1, world_size=2, start=LoaderPosition(epoch, batch)),
                       8 - start)
        for got, want in zip(resumed, reference[start:], strict=True):
            assert (got["epoch"], got["batch"], got["key"]) == (want["epoch"], want["batch"], want["key"])
            assert all(torch.equal(g, w) for g, w in zip(got["views"], want["views"]))


def test_shards_without_an_index_are_refused_with_the_command_to_fix_it(photos, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(photos, folder)
    (folder / "shard-000001.idx").unlink()
    with pytest.raises(ManifestError, match=r"shard .*shard-000001\.tar has no DALI index.*foundry prep index"):
        dali_stream(folder, views((1, [rrc(32)])), 4)


def corrupt_first_image(shard) -> str:
    """Overwrites the start of the shard's first JPEG (its header) in place; returns its key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"not a JPEG any more" * 4)
    return member.name.split(".")[0]


def test_corrupt_jpeg_in_a_shard_is_skipped_and_counted(photos, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(photos, folder)
    bad_key = corrupt_first_image(folder / "shard-000002.tar")
    recipe = views((1, [rrc(32)]))
    with pytest.raises(RuntimeError):  # indexed as it was, DALI's decoder stops the epoch
        take(dali_stream(folder, recipe, 4), 10)

    done = run_cli(["prep", "index", str(folder), "--workers", "1"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "39 samples indexed in 5 shards, 1 left out" in done.stdout
    (record,) = [s for s in read_manifest(folder)["shards"] if s.get("index_skipped")]
    assert record["name"] == "shard-000002.tar" and record["index_skipped"][0]["key"] == bad_key
    stream = dali_stream(folder, recipe, 3)
    assert (stream.num_samples, stream.skipped, stream.steps_per_epoch()) == (39, 1, 13)
    keys = keys_of(take(stream, 13))
    assert sorted(keys) == sorted(set(tar_labels(photos)) - {bad_key})


# ----------------------------------------------------------------------------- training


def test_pretrain_with_the_dali_backend_on_cpu_and_resume(fmnist, tmp_path):
    """`foundry pretrain data.backend=dali`: 4 real steps on DALI's CPU backend, then resumed to 6."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "run.yaml", fmnist, out)
    common = ["data.backend=dali", "data.num_workers=1", "mlflow.tracking_uri=sqlite:///" + str(tmp_path / "m.db")]
    first = run_cli(["pretrain", str(recipe), *common], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training loader: dali on cpu" in first.stderr
    assert "step 4/4" in first.stderr
    second = run_cli(["pretrain", str(recipe), *common, "train.max_steps=6"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at step 4 from" in second.stderr and "step 6/6" in second.stderr
    loss = float(second.stderr.split("step 6/6 loss ")[1].split()[0])
    assert np.isfinite(loss)


def test_eval_features_read_by_dali_split_over_ranks_match_the_torch_loader(photos, one_thread):
    """Evaluation through DALI (the GPU's loader; its CPU backend here): the same samples as the torch
    loader, each once over 2 ranks, the same views up to the two resamplers' rounding. The
    "backbone" flattens its input, so the features are the views' pixels."""
    from ssl_foundry.pipeline.evaluate.knn import extract_features

    common = dict(image_size=32, mean=MEAN, std=STD, batch_size=8, num_workers=1)
    reference, labels = extract_features(torch.nn.Flatten(), str(photos), **common)
    shares = [extract_features(torch.nn.Flatten(), str(photos), rank=rank, world_size=2, backend="dali", **common)
              for rank in range(2)]
    assert [len(share_labels) for _, share_labels in shares] == [20, 20]
    assert torch.equal(torch.cat([share_labels for _, share_labels in shares]), labels)  # shard order, split
    views = torch.cat([share for share, _ in shares]).view(-1, 3, 32, 32)
    diffs = torch.stack([(to_pixels(d) - to_pixels(t)).abs() for d, t in zip(views, reference.view(-1, 3, 32, 32))])
    assert diffs.mean() < 1.0  # in 0..255 units, as the training views
    assert torch.quantile(diffs.flatten()[::7], 0.99) < 6
