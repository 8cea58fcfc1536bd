"""The batched augmentation backend (``data.backend=batched``, ``pipeline.data.augment.batched_backend``):
a micro-batch augmented at once by tensor ops must mean what the torchvision backend means for
the same spec. Checked op by op against torchvision's functional ops (fixed parameters, real
photos), and as distributions: crop windows and flips measured on a coordinate probe, and the
statistics of the whole op chain on real photos, within 4 standard errors estimated from the
samples (plus a stated allowance for torchvision's rounding to uint8 after every op)."""
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from augment_parity import (FLIP, MULTI_CROP, PARITY_RECIPE, coordinate_probe, crop_geometry, epochs_of_views, rrc,
                            take, torch_stream, views, within)
from ssl_foundry.data_prep.images import prep_images
from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.data.augment import spec
from ssl_foundry.pipeline.data.augment import batched_backend as ops
from ssl_foundry.pipeline.data.augment.batched_backend import BATCHED_OPS, BatchedMultiViewTransform
from ssl_foundry.pipeline.data.augment.parity import paired_within
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.loader import train_backend
from ssl_foundry.pipeline.data.position import LoaderPosition

RECIPE = "configs/simclr_resnet18_fmnist.yaml"


def batched_stream(folder, view_specs, batch_size, **kwargs):
    return torch_stream(folder, view_specs, batch_size, transform=BatchedMultiViewTransform, **kwargs)


def test_the_batched_backend_implements_exactly_the_spec_ops():
    assert set(BATCHED_OPS) == set(spec.SPEC_OPS)


@pytest.fixture(scope="module")
def fruits(photos) -> torch.Tensor:
    """A real photo, uint8 (3, H, W)."""
    image = Image.open(photos.parent / "images" / "opencv" / "fruits.jpg").convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def test_each_op_equals_torchvision_on_a_photo(fruits):
    """Every op with its random parameter fixed, on a real photo, against torchvision's functional op
    on uint8: equal within a grey level (torchvision rounds to uint8 after each op, here the values
    stay float). Hue, contrast and saturation take one factor per sample: two samples, two factors."""
    pair = torch.stack([fruits, fruits.flip(-1)]).float()
    cases = {  # name: (batched op, torchvision op per sample i)
        "brightness": (lambda x: ops.adjust_brightness(x, torch.tensor([1.3, 0.6])),
                       lambda t, i: F.adjust_brightness(t, [1.3, 0.6][i])),
        "contrast": (lambda x: ops.adjust_contrast(x, torch.tensor([0.6, 1.4])),
                     lambda t, i: F.adjust_contrast(t, [0.6, 1.4][i])),
        "saturation": (lambda x: ops.adjust_saturation(x, torch.tensor([0.5, 1.5])),
                       lambda t, i: F.adjust_saturation(t, [0.5, 1.5][i])),
        "hue": (lambda x: ops.adjust_hue(x, torch.tensor([0.1, -0.3])), lambda t, i: F.adjust_hue(t, [0.1, -0.3][i])),
        "grayscale": (lambda x: ops._grayscale(x, spec.Grayscale()), lambda t, i: F.rgb_to_grayscale(t, 3)),
        "solarize": (lambda x: ops._solarize(x, spec.Solarize(128)), lambda t, i: F.solarize(t, 128)),
        "blur": (lambda x: ops._gaussian_blur(x, spec.GaussianBlur(9, (1.5, 1.5))),
                 lambda t, i: F.gaussian_blur(t, [9, 9], [1.5, 1.5])),
        "flip": (lambda x: ops._horizontal_flip(x, spec.HorizontalFlip()), lambda t, i: F.horizontal_flip(t)),
    }
    for name, (batched_op, torch_op) in cases.items():
        got = batched_op(pair.clone())
        for i in range(2):
            want = torch_op(pair[i].to(torch.uint8), i).float()
            assert got[i].shape == want.shape, name
            # ITU-R 601 luma here (0.299), torchvision's 0.2989: a tenth of a grey level apart
            assert (got[i] - want).abs().max() <= 1.5, name


@pytest.mark.parametrize("size", [(96, 128), (400, 333)])
def test_resize_and_center_crop_equal_torchvision(fruits, size):
    """Resize by the whole image as the box: bilinear, as torchvision (shrinking: a box filter
    where torchvision's antialiasing is a triangle, so only on average); center_crop: the same
    window, zero padding where the photo is smaller."""
    x, sizes = fruits[None].float(), torch.tensor([fruits.shape[-2:]])
    got = ops._resize(x, spec.Resize(size), sizes)[0]
    want = F.resize(fruits, list(size), antialias=True).float()
    diff = (got - want).abs()
    assert diff.mean() < 2.0 and torch.quantile(diff.flatten(), 0.99) < 25
    crop = spec.CenterCrop((500, 200))  # taller than the photo (480 x 512): padded rows
    assert torch.equal(ops._center_crop(x, crop, sizes)[0], F.center_crop(fruits, [500, 200]).float())


def test_crop_boxes_follow_the_spec_and_fall_back_to_the_central_crop():
    a = spec.RandomResizedCrop(32, scale=(0.2, 1.0))
    height, width = torch.full((4000,), 28), torch.full((4000,), 28)
    x1, y1, x2, y2 = ops.crop_boxes(height, width, a).unbind(1)
    w, h = x2 - x1, y2 - y1
    assert bool(((x1 >= 0) & (y1 >= 0) & (x2 <= 28) & (y2 <= 28)).all())
    assert torch.equal(torch.round(w), w) and torch.equal(torch.round(x1), x1)  # integer windows
    area = w * h / 784
    assert area.min() >= 0.2 * 0.85 and area.max() <= 1.0  # rounding to whole pixels moves the area a bit
    # An image too narrow for every ratio in [3/4, 4/3] takes the fallback: full width, central.
    boxes = ops.crop_boxes(torch.tensor([100]), torch.tensor([10]), spec.RandomResizedCrop(8, scale=(0.9, 1.0)))
    assert boxes.tolist() == [[0.0, 43.0, 10.0, 56.0]]  # h = round(10 / (3/4)) = 13, top (100 - 13) // 2 = 43


def test_crop_area_aspect_ratio_and_flip_rate_match_torchvision(tmp_path):
    coordinate_probe(tmp_path / "probe", 40)
    prep_images(tmp_path / "probe", tmp_path / "shards", shard_size=8, workers=1)
    recipe = views((2, [rrc(64), FLIP]))
    measured = {}
    for name, stream in (("batched", batched_stream(tmp_path / "shards", recipe, 8)),
                         ("torch", torch_stream(tmp_path / "shards", recipe, 8))):
        area, aspect, flipped = crop_geometry(epochs_of_views(stream, 25)[1])
        measured[name] = area, aspect.log()
        assert area.min() > 0.08 * 0.95 and area.max() < 1.03, name
        assert aspect.min() > 0.75 * 0.96 and aspect.max() < 4 / 3 * 1.04, name
        rate, se = flipped.float().mean(), (0.25 / len(flipped)) ** 0.5
        assert abs(rate - 0.5) < 4 * se, (name, float(rate))
    for b, t in zip(measured["batched"], measured["torch"]):
        assert within(b, t)
        assert abs(b.std() - t.std()) < 0.2 * t.std()  # spread too, not only the mean


def test_statistics_of_the_same_spec_match_torchvision(photos, one_thread):
    """The full SimCLR/BYOL-style op chain on real photos, 12 epochs (960 views) per backend:
    per-channel mean and std of the outputs agree (0..255 units, paired by photo), and the grey
    rate is p=0.2 in both. Allowance: 2 grey levels, torchvision's truncation to uint8 over ~4 ops."""
    epochs = 12
    b_keys, batched = epochs_of_views(batched_stream(photos, PARITY_RECIPE, 8), 5 * epochs)
    t_keys, torchvision = epochs_of_views(torch_stream(photos, PARITY_RECIPE, 8), 5 * epochs)
    assert batched.shape == torchvision.shape == (2 * 40 * epochs, 3, 48, 48)
    for channel in range(3):
        b, t = batched[:, channel].flatten(1), torchvision[:, channel].flatten(1)
        assert paired_within(b_keys, b.mean(1), t_keys, t.mean(1), allowance=2.0), channel
        assert paired_within(b_keys, b.std(1), t_keys, t.std(1), allowance=2.0), channel
    for name, rendered in (("batched", batched), ("torch", torchvision)):
        grey = (rendered.amax(1) - rendered.amin(1)).flatten(1).amax(1) < 0.01
        rate, se = grey.float().mean(), (0.2 * 0.8 / len(grey)) ** 0.5
        assert abs(rate - 0.2) < 4 * se, (name, float(rate))


def test_views_of_photos_of_different_sizes_and_multi_crop(photos):
    """Photos differ in size: each view is batched after its crop; multi-crop views have the sizes
    the torch backend gives them."""
    (batch,) = take(batched_stream(photos, MULTI_CROP, 8), 1)
    expected = MultiViewTransform(MULTI_CROP, [0.5] * 3, [0.5] * 3)(torch.zeros(3, 256, 300, dtype=torch.uint8))
    assert [tuple(v.shape) for v in batch["views"]] == [(8, *e.shape) for e in expected]
    assert all(v.dtype == torch.float32 and v.std() > 0.1 for v in batch["views"])


def test_resumed_stream_continues_the_uninterrupted_one(photos):
    """Randomness is seeded per micro-batch: a stream started at (epoch, batch) gives bitwise the
    views the uninterrupted stream gave there."""
    recipe = views((2, [rrc(32), FLIP, {"op": "color_jitter", "p": 0.8, "args": {"brightness": 0.4, "hue": 0.1}}]))
    reference = take(batched_stream(photos, recipe, 8), 7)  # 5 batches an epoch
    resumed = take(batched_stream(photos, recipe, 8, start=LoaderPosition(0, 3)), 4)  # into epoch 1
    for got, want in zip(resumed, reference[3:], strict=True):
        assert (got["epoch"], got["batch"], got["key"]) == (want["epoch"], want["batch"], want["key"])
        assert all(torch.equal(g, w) for g, w in zip(got["views"], want["views"]))


def test_a_skipped_sample_keeps_the_batch_whole_with_fresh_views(fmnist, tmp_path):
    """data.on_bad_sample=skip: the bad sample's slot repeats another sample of its micro-batch, which
    the batched backend augments afresh there (views of its own), and the batch keeps its size."""
    from ssl_foundry.data_prep.shard_format import read_samples
    from test_faults_data import EPOCH_STEPS, copy_shards, corrupt_image

    folder = copy_shards(fmnist, tmp_path)
    bad = read_samples(folder / "shard-000006.tar")[9][0]
    corrupt_image(folder / "shard-000006.tar", bad)
    stream = batched_stream(folder, views((2, [rrc(16), FLIP])), 8, on_bad_sample="skip")
    [hit] = [b for b in take(stream, EPOCH_STEPS) if b["skipped"]]
    assert bad not in hit["key"] and len(hit["key"]) == 8 and len(set(hit["key"])) == 7
    assert all(v.shape == (8, 3, 16, 16) for v in hit["views"])
    first, again = [i for i, key in enumerate(hit["key"]) if hit["key"].count(key) == 2]
    assert not torch.equal(hit["views"][0][first], hit["views"][0][again])


def test_batched_is_the_cpu_default_and_its_limits_are_config_errors(video_clips):
    assert train_backend("auto", torch.device("cpu")) == ("batched", "auto: on cpu")
    assert train_backend("auto", torch.device("cpu"), str(video_clips))[0] == "torch"  # clips: per-sample transforms
    with pytest.raises(ConfigError, match="data.backend=batched augments images only"):
        train_backend("batched", torch.device("cpu"), str(video_clips))
    with pytest.raises(ConfigError, match="'random_resized_crop' with p=0.5: views of one batch would have"):
        load_config(RECIPE, ["data.backend=batched", "data.views=[{count: 2, ops: [{op: random_resized_crop, "
                             "p: 0.5, args: {size: 32}}]}]"], check_paths=False)
