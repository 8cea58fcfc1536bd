"""The video self-supervision methods (issue 8): TCN, Shuffle and Learn, CPC and VideoMAE.

Each loss against a case worked by hand (and, for CPC, a loop over eq. 4), each method's frame
sampling against its rules, every method forward + backward on a synthetic clip batch with the
backbone the trainer exports, the errors a bad config gets, and one learnability check (Shuffle
and Learn on moving squares). Single process, one thread, tiny models.
"""
import math
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.models.vision_transformer import VisionTransformer

from ssl_foundry.models.backbones import create_backbone, sincos_1d_pos_embed
from ssl_foundry.models.losses import cpc_info_nce_loss, mae_loss, tcn_info_nce_loss, tcn_triplet_loss
from ssl_foundry.models.methods.mae import patchify, random_masking
from ssl_foundry.models.methods.shuffle_and_learn import order_tuple_candidates, sample_order_tuples
from ssl_foundry.models.methods.tcn import sample_tcn_frames
from ssl_foundry.models.methods.video_mae import tube_masking
from ssl_foundry.models.registry import create_method, method_class, method_names
from ssl_foundry.models.video import encode_frames, min_clip_frames, select_frames

VIDEO_METHODS = ("tcn", "shuffle_and_learn", "cpc", "video_mae")
VIT_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2}
SMALL = {
    "tcn": {"proj_hidden_dim": 32},
    "shuffle_and_learn": {"classifier_hidden_dim": 32},
    "cpc": {"embed_dim": 32, "context_dim": 32},
    "video_mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_method(name: str, backbone: str = "resnet18", **overrides):
    torch.manual_seed(0)
    net = create_backbone("vit_tiny_patch16_224", **VIT_ARGS) if backbone == "vit" else create_backbone(backbone)
    return create_method(name, net, **{**SMALL[name], **overrides}).train()


def clips(batch: int = 4, frames: int = 8, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- interface


def test_video_methods_are_registered_as_clip_methods():
    assert set(VIDEO_METHODS) <= set(method_names())
    for name in VIDEO_METHODS:
        assert method_class(name).input_kind == "clip" and method_class(name).num_views == 1
    for name in ("simclr", "mae"):  # image methods have no input_kind: the loader treats it as "image"
        assert getattr(method_class(name), "input_kind", "image") == "image"


def test_encode_frames_is_the_image_backbone_per_frame():
    torch.manual_seed(0)
    net = create_backbone("resnet18").eval()
    x = clips(2, 3, 16)
    with torch.no_grad():
        per_frame = torch.stack([net(x[:, t]) for t in range(3)], dim=1)
        assert torch.allclose(encode_frames(net, x), per_frame, atol=1e-5)
    index = torch.tensor([[2, 0], [1, 1]])
    assert torch.equal(select_frames(x, index)[1, 0], x[1, 1]) and torch.equal(select_frames(x, index)[0, 0], x[0, 2])


@pytest.mark.parametrize("name,backbone", [("tcn", "resnet18"), ("tcn", "vit"), ("shuffle_and_learn", "resnet18"),
                                           ("cpc", "resnet18"), ("video_mae", "vit")])
def test_forward_backward_reaches_the_backbone(name, backbone):
    # the ViT TCN case trains the triplet form, with a margin wide enough that the hinge is active
    triplet = {"loss": "triplet", "margin": 2.0} if (name, backbone) == ("tcn", "vit") else {}
    model = tiny_method(name, backbone, **triplet)
    out = model([clips()])
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if model.get_parameter(n).grad is None]
    assert not missing, missing
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters() if p.requires_grad)


def test_tcn_infonce_and_triplet_both_train():
    for loss in ("infonce", "triplet"):
        model = tiny_method("tcn", loss=loss)
        out = model([clips()])
        out["loss"].backward()
        assert math.isfinite(out["loss"].item())
        assert model.backbone.conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name,frames,args,needed", [
    ("tcn", 2, {}, 3),  # negative_margin=2 -> 3 frames
    ("tcn", 4, {"negative_margin": 4, "positive_window": 2}, 5),
    ("shuffle_and_learn", 3, {}, 4),  # a < b < c < d with min_gap=1 -> 4 frames
    ("cpc", 3, {"prediction_steps": 3}, 4),
])
def test_too_short_clips_name_the_data_key(name, frames, args, needed):
    model = tiny_method(name, **args)
    with pytest.raises(ValueError, match=rf"data\.clip_frames to {needed}.*model\.method_args\."):
        model([clips(4, frames, 16)])


def test_min_clip_frames_from_the_config_alone():
    """What a config check of data.clip_frames can ask before building anything."""
    assert min_clip_frames(method_class("tcn"), {}) == 3
    assert min_clip_frames(method_class("tcn"), {"negative_margin": 5, "positive_window": 2}) == 6
    assert min_clip_frames(method_class("shuffle_and_learn"), {"min_gap": 2}) == 5
    assert min_clip_frames(method_class("cpc"), {}) == 4
    assert min_clip_frames(method_class("video_mae"), {}) == 1
    assert tiny_method("cpc", prediction_steps=5).min_frames == min_clip_frames(method_class("cpc"),
                                                                                 {"prediction_steps": 5})


def test_bad_method_args_name_the_arg():
    cases = [
        ("tcn", {"loss": "npairs"}, r"model\.method_args\.loss"),
        ("tcn", {"positive_window": 2, "negative_margin": 2},
         r"negative_margin \(2\) must be larger than positive_window"),
        ("shuffle_and_learn", {"positive_fraction": 1.0}, r"model\.method_args\.positive_fraction"),
        ("shuffle_and_learn", {"max_gap": 1}, r"model\.method_args\.max_gap"),
        ("cpc", {"prediction_steps": 0}, r"model\.method_args\.prediction_steps"),
        ("video_mae", {"mask_ratio": 1.0}, r"model\.method_args\.mask_ratio"),
        ("video_mae", {"temporal_pos_embed": "3d"}, r"model\.method_args\.temporal_pos_embed"),
    ]
    for name, args, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny_method(name, "vit" if name == "video_mae" else "resnet18", **args)
    with pytest.raises(KeyError, match="model.method_args.window: 'tcn' has no such argument. Valid: loss"):
        tiny_method("tcn", window=3)
    with pytest.raises(ValueError, match="VisionTransformer"):
        tiny_method("video_mae", "resnet18")


def test_video_methods_reject_image_batches():
    model = tiny_method("cpc")
    with pytest.raises(ValueError, match=r"clips of shape \(B, T, C, H, W\)"):
        model([torch.randn(4, 3, 16, 16)])
    with pytest.raises(ValueError, match="data.views"):
        model([clips(), clips()])


# ----------------------------------------------------------------------------- TCN


def test_tcn_triplet_loss_hand_worked():
    # normalised: a = (1, 0), p = (0.6, 0.8), n = (0, 1): |a-p|^2 = 0.4^2 + 0.8^2 = 0.8, |a-n|^2 = 2
    a = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8], [0.0, 3.0]])
    n = torch.tensor([[0.0, 5.0], [3.0, 4.0]])
    # triplet 1: [0.8 - 2 + m]_+ ; triplet 2: p = (0, 1), n = (0.6, 0.8): [2 - 0.8 + m]_+
    assert tcn_triplet_loss(a, p, n, margin=0.2).item() == pytest.approx((0.0 + 1.4) / 2, abs=1e-6)
    assert tcn_triplet_loss(a, p, n, margin=1.5).item() == pytest.approx((0.3 + 2.7) / 2, abs=1e-6)
    assert tcn_triplet_loss(a[:1], p[:1], n[:1], margin=0.0).item() == 0.0


@pytest.mark.parametrize("t", [1.0, 0.5])
def test_tcn_info_nce_loss_hand_worked(t):
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # a_2 normalises to (0, 1)
    p = torch.tensor([[3.0, 0.0], [0.6, 0.8]])
    negatives = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]],  # clip 1: one valid far frame
                              [[1.0, 0.0], [0.0, -1.0]]])  # clip 2: two
    mask = torch.tensor([[True, False], [True, True]])
    # anchor 1: positives a.p = 1, 0.6; far frame 0 -> -log e^{1/t} / (e^{1/t} + e^{0.6/t} + e^0)
    l1 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(0.6 / t) + 1))
    # anchor 2: positives a.p = 0, 0.8; far frames 0, -1
    l2 = -math.log(math.exp(0.8 / t) / (1 + math.exp(0.8 / t) + 1 + math.exp(-1 / t)))
    assert tcn_info_nce_loss(a, p, negatives, mask, t).item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_tcn_sampling_rules_and_seed():
    window, margin, frames = 2, 4, 9
    for seed in range(5):
        torch.manual_seed(seed)
        anchor, positive, negative, far = sample_tcn_frames(64, frames, window, margin)
        gap = (positive - anchor).abs()
        assert ((gap >= 1) & (gap <= window)).all()
        assert ((negative - anchor).abs() >= margin).all()
        t = torch.arange(frames)
        assert torch.equal(far, (t[None] - anchor[:, None]).abs() >= margin) and far.any(dim=1).all()
    torch.manual_seed(3)
    first = sample_tcn_frames(16, frames, window, margin)
    torch.manual_seed(3)
    again = sample_tcn_frames(16, frames, window, margin)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    # a short clip: only anchors with a far frame (0 and 4 of 5 frames with margin 4)
    torch.manual_seed(0)
    anchor = sample_tcn_frames(200, 5, 1, 4)[0]
    assert set(anchor.tolist()) == {0, 4}


# ----------------------------------------------------------------------------- Shuffle and Learn


def test_order_tuple_candidates_hand_worked():
    ordered, shuffled = order_tuple_candidates(4, max_gap=3, min_gap=1)
    assert sorted(map(tuple, ordered.tolist())) == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    # spans (b, d) with d - b >= 2: (0, 2), (0, 3), (1, 3); middle frame outside [b, d]
    assert sorted(map(tuple, shuffled.tolist())) == [(0, 3, 2), (1, 0, 3)]
    ordered, _ = order_tuple_candidates(6, max_gap=2, min_gap=1)
    assert ((ordered[:, 2] - ordered[:, 0]) <= 2).all() and len(ordered) == 4


@pytest.mark.parametrize("fraction,batch", [(0.25, 16), (0.5, 10), (0.75, 8)])
def test_shuffle_and_learn_sampling(fraction, batch):
    frames, min_gap, max_gap = 10, 2, 6
    torch.manual_seed(0)
    seen_directions = set()
    for _ in range(20):
        tuples, labels = sample_order_tuples(batch, frames, fraction, max_gap, min_gap, reverse=True)
        assert labels.sum().item() == round(fraction * batch)  # the ratio, exactly, every batch
        for (b, c, d), label in zip(tuples.tolist(), labels.tolist()):
            lo, hi = min(b, d), max(b, d)
            assert 2 <= hi - lo <= max_gap and 0 <= c < frames
            if label:  # in order, forwards or backwards
                assert b < c < d or b > c > d
                seen_directions.add(b < d)
            else:  # the middle frame is out of [b, d] by min_gap or more
                assert c <= lo - min_gap or c >= hi + min_gap
    assert seen_directions == {True, False}
    torch.manual_seed(0)
    forward, _ = sample_order_tuples(64, frames, 0.5, max_gap, min_gap, reverse=False)
    assert ((forward[:, 0] < forward[:, 2])).all()
    torch.manual_seed(7)
    one = sample_order_tuples(batch, frames, fraction, max_gap, min_gap)
    torch.manual_seed(7)
    two = sample_order_tuples(batch, frames, fraction, max_gap, min_gap)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def moving_squares(n: int, frames: int = 8, size: int = 16, square: int = 4, seed: int = 0) -> torch.Tensor:
    """Clips of a bright square moving in a straight line over a dark frame, start and end at random."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((n, frames, 3, size, size), -1.0)
    span = size - square

    def point():
        return torch.randint(0, span + 1, (2,), generator=g).tolist()

    for i in range(n):
        (x0, y0), (x1, y1) = point(), point()
        while abs(x1 - x0) + abs(y1 - y0) < span // 2:
            x1, y1 = point()
        for t in range(frames):
            x, y = round(x0 + (x1 - x0) * t / (frames - 1)), round(y0 + (y1 - y0) * t / (frames - 1))
            out[i, t, :, y:y + square, x:x + square] = 1.0
    return out


def train_on_moving_squares(model, steps: int, batch: int) -> tuple[float, float, list[float]]:
    """Adam on random batches of moving-square clips: mean loss of the first and of the last 5 steps."""
    data = moving_squares(256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        out = model([data[torch.randint(0, len(data), (batch,))]])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5, losses


def test_shuffle_and_learn_learns_the_order_of_moving_squares():
    """With balanced classes, chance is ln 2: the loss must fall clearly below it in 40 steps."""
    torch.manual_seed(0)
    model = create_method("shuffle_and_learn", create_backbone("resnet18"), positive_fraction=0.5).train()
    first, last, losses = train_on_moving_squares(model, 40, 32)
    assert last < first - 0.1 and last < math.log(2) - 0.05, losses


def test_tcn_learns_moving_squares():
    """InfoNCE over 16 clips: guessing among the batch's 16 positives gives about ln 16; TCN must
    fall well below it in 15 steps."""
    torch.manual_seed(0)
    model = create_method("tcn", create_backbone("resnet18"), proj_hidden_dim=64).train()
    first, last, losses = train_on_moving_squares(model, 15, 16)
    assert last < first - 0.5 and last < math.log(16) - 0.5, losses


# ----------------------------------------------------------------------------- CPC


def reference_cpc(predictions, z):
    """Eq. 4 by loops: for each k, mean over (b, t) with t + k < T of
    -log exp(z_{b,t+k} . p_{b,t,k}) / sum_{b', t'} exp(z_{b',t'} . p_{b,t,k}); then mean over k."""
    batch, frames, steps, _ = predictions.shape
    per_k = []
    for k in range(1, steps + 1):
        terms = []
        for b in range(batch):
            for t in range(frames - k):
                pred = predictions[b, t, k - 1].tolist()
                score = lambda bb, tt: math.exp(sum(x * y for x, y in zip(z[bb, tt].tolist(), pred)))  # noqa: E731
                denominator = sum(score(bb, tt) for bb in range(batch) for tt in range(frames))
                terms.append(-math.log(score(b, t + k) / denominator))
        per_k.append(sum(terms) / len(terms))
    return sum(per_k) / steps


def test_cpc_info_nce_hand_worked():
    # one sequence of 2 steps, k = 1: W_1 c_0 = (1, 0), z_0 = (0, 0), z_1 = (1, 0):
    # -log e^1 / (e^0 + e^1) = log(1 + e^-1)
    predictions = torch.tensor([[[[1.0, 0.0]], [[9.0, 9.0]]]])  # (1, 2, 1, 2); the t = 1 row predicts past the end
    z = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    assert cpc_info_nce_loss(predictions, z).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)


@pytest.mark.parametrize("batch,frames,steps", [(2, 3, 2), (3, 5, 3), (1, 4, 1)])
def test_cpc_info_nce_matches_eq_4_loops(batch, frames, steps):
    g = torch.Generator().manual_seed(batch * 10 + frames)
    predictions = torch.randn(batch, frames, steps, 4, generator=g, dtype=torch.float64)
    z = torch.randn(batch, frames, 4, generator=g, dtype=torch.float64)
    got = cpc_info_nce_loss(predictions.float(), z.float()).item()
    assert got == pytest.approx(reference_cpc(predictions, z), rel=1e-5)


def test_cpc_context_is_causal():
    """c_t (and so every prediction from t) does not change when a later frame does."""
    model = tiny_method("cpc").eval()
    x = clips(2, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn_like(y[:, 4:])
    with torch.no_grad():
        c_x, _ = model.context(model.encoder_head(encode_frames(model.backbone, x)))
        c_y, _ = model.context(model.encoder_head(encode_frames(model.backbone, y)))
    assert torch.allclose(c_x[:, :4], c_y[:, :4], atol=1e-6) and not torch.allclose(c_x[:, 4:], c_y[:, 4:])


# ----------------------------------------------------------------------------- global batch (2 gloo ranks)

WORLD, LOCAL = 2, 3


def global_loss_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    n = WORLD * LOCAL
    return {"anchor": torch.randn(n, 4, generator=g), "positive": torch.randn(n, 4, generator=g),
            "negatives": torch.randn(n, 5, 4, generator=g), "mask": torch.rand(n, 5, generator=g) < 0.6,
            "predictions": torch.randn(n, 5, 2, 4, generator=g), "z": torch.randn(n, 5, 4, generator=g)}


def gathered_losses(part: slice) -> dict[str, tuple[float, dict[str, torch.Tensor]]]:
    """TCN InfoNCE and CPC on the ``part`` of the global batch: loss and input gradients."""
    x = {k: v[part].clone().requires_grad_(v.is_floating_point()) for k, v in global_loss_inputs().items()}
    tcn = tcn_info_nce_loss(x["anchor"], x["positive"], x["negatives"], x["mask"], 0.5)
    cpc = cpc_info_nce_loss(x["predictions"], x["z"])
    out = {}
    for name, loss, keys in (("tcn", tcn, ("anchor", "positive", "negatives")), ("cpc", cpc, ("predictions", "z"))):
        grads = torch.autograd.grad(loss, [x[k] for k in keys])
        out[name] = (loss.item(), dict(zip(keys, grads)))
    return out


def _loss_rank(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.save(gathered_losses(slice(rank * LOCAL, (rank + 1) * LOCAL)), f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_negatives_come_from_the_global_batch(tmp_path):
    """On 2 ranks, the mean of the ranks' TCN InfoNCE / CPC losses is the one-process loss of the
    concatenated batch, and each rank's input gradients are world_size times the one-process ones
    (what DDP's gradient averaging expects), through the gathers with gradient."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_loss_rank, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = gathered_losses(slice(None))
    for name in ("tcn", "cpc"):
        loss, grads = single[name]
        assert sum(r[name][0] for r in ranks) / WORLD == pytest.approx(loss, rel=1e-5)
        for key, grad in grads.items():
            per_rank = torch.cat([r[name][1][key] for r in ranks]) / WORLD
            torch.testing.assert_close(per_rank, grad, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


# ----------------------------------------------------------------------------- VideoMAE


@pytest.mark.parametrize("patches,frames,ratio", [(16, 8, 0.9), (16, 3, 0.75), (49, 4, 0.9)])
def test_tube_mask_is_one_spatial_mask_for_every_frame(patches, frames, ratio):
    torch.manual_seed(0)
    x = torch.randn(5, frames * patches, 6)
    visible, mask, ids_restore = tube_masking(x, frames, ratio)
    keep = round(patches * (1 - ratio))
    per_frame = mask.view(5, frames, patches)
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))  # the same mask in every frame
    assert (mask.sum(dim=1) == frames * (patches - keep)).all()  # the ratio, exactly
    assert visible.shape == (5, frames * keep, 6)
    # the visible tokens are those of x where the mask is 0 (in the shuffled order, as random_masking)
    assert torch.equal(visible[..., 0].sort(dim=1).values, x[mask == 0].view(5, -1, 6)[..., 0].sort(dim=1).values)
    # ids_restore puts [visible, mask tokens] back in the original order: visible tokens at their places
    filled = torch.cat([visible, torch.zeros(5, frames * (patches - keep), 6)], 1)
    restored = torch.gather(filled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 6))
    assert torch.equal(restored, x * (1 - mask).unsqueeze(-1))


def test_tube_masking_of_one_frame_is_random_masking():
    x, noise = torch.randn(3, 16, 4), torch.rand(3, 16)
    for a, b in zip(tube_masking(x, 1, 0.75, noise), random_masking(x, 0.75, noise)):
        assert torch.equal(a, b)


def test_video_mae_loss_is_on_masked_tokens_only():
    model = tiny_method("video_mae", "vit")
    x = clips(2, 4)
    latent, mask, ids_restore = model.forward_encoder(x)
    patches = model.num_patches  # 16 patches of 8 x 8 in a 32 x 32 frame; 0.9 keeps 2 per frame
    assert latent.shape[1] == model.num_prefix + 4 * 2  # the encoder sees the visible space-time tokens only
    pred = model.forward_decoder(latent, ids_restore, 4)
    assert pred.shape == (2, 4 * patches, 8 * 8 * 3)
    pred.retain_grad()
    target = patchify(x.flatten(0, 1), 8).unflatten(0, (2, 4)).flatten(1, 2)
    loss = mae_loss(pred, target, mask)
    loss.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1].abs().sum(dim=-1) > 0).all()
    # and the loss is the mean over masked tokens of the normalised-pixel error
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = ((pred - t) ** 2).mean(-1)[mask == 1].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_video_mae_learns_moving_squares():
    torch.manual_seed(0)
    net = create_backbone("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2)
    model = create_method("video_mae", net, **SMALL["video_mae"]).train()
    first, last, losses = train_on_moving_squares(model, 30, 16)
    assert last < first / 2, losses


def test_video_mae_positions_and_exported_backbone():
    model = tiny_method("video_mae", "vit")
    assert model.temporal_pos_embed is None  # fixed sin-cos by default, owned by the method
    assert not model.backbone.pos_embed.requires_grad  # spatial: the ViT's own, fixed sin-cos as MAE
    emb = sincos_1d_pos_embed(3, 4)  # w = (1, 1/100): [sin t, sin t/100, cos t, cos t/100]
    assert torch.allclose(emb[1], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))
    model([clips()])["loss"].backward()
    # the backbone is a plain timm image ViT: its state dict loads into timm, which runs on images
    assert isinstance(model.backbone, VisionTransformer)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    plain.load_state_dict(model.backbone.state_dict(), strict=True)
    assert plain(torch.randn(2, 3, 32, 32)).shape == (2, 192)
    learned = tiny_method("video_mae", "vit", temporal_pos_embed="learn", max_frames=8)
    learned([clips()])["loss"].backward()
    assert learned.temporal_pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"lower data\.clip_frames to 8 or fewer.*model\.method_args\.max_frames"):
        learned([clips(2, 9)])
