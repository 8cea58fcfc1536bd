"""MoCo v2, MoCo v3, BYOL, Barlow Twins and MAE as modules (single process): momentum encoders and
their schedule, the MoCo queue and shuffling BN, MAE's masking and reconstruction, and what the
trainer relies on (registry, ``backbone``, targets out of the optimizer but in the state_dict)."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ssl_foundry.models.backbones import create_backbone, sincos_pos_embed
from ssl_foundry.models.distributed import batch_shuffle, batch_unshuffle
from ssl_foundry.models.losses import info_nce_loss
from ssl_foundry.models.methods.mae import patchify, random_masking, unpatchify
from ssl_foundry.models.methods.moco_v2 import KeyQueue
from ssl_foundry.models.momentum import MomentumEncoder, cosine_momentum
from ssl_foundry.models.registry import create_method, method_class, method_names
from ssl_foundry.pipeline.config import Config
from ssl_foundry.pipeline.train.optim import build_optimizer

VIT_ARGS = {"img_size": 16, "patch_size": 4, "depth": 2}
SMALL_HEADS = {
    "moco_v2": {"proj_hidden_dim": 32, "proj_out_dim": 16, "queue_size": 32},
    "moco_v3": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32},
    "byol": {"proj_hidden_dim": 32, "proj_out_dim": 16, "pred_hidden_dim": 32},
    "barlow_twins": {"proj_hidden_dim": 32, "proj_out_dim": 16},
    "mae": {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
}
TARGETS = {"moco_v2": "key_encoder", "moco_v3": "momentum_encoder", "byol": "target"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_method(name: str, backbone: str = "vit", **overrides) -> nn.Module:
    torch.manual_seed(0)
    net = create_backbone("vit_tiny_patch16_224", **VIT_ARGS) if backbone == "vit" else create_backbone("resnet18")
    return create_method(name, net, **{**SMALL_HEADS[name], **overrides}).train()


def views_for(model: nn.Module, batch: int = 8, size: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(model.num_views)]


# ----------------------------------------------------------------------------- interface


def test_all_methods_registered_with_their_view_count():
    assert {"simclr", "moco_v2", "moco_v3", "mae", "byol", "barlow_twins"} <= set(method_names())
    assert {name: method_class(name).num_views for name in SMALL_HEADS} == {
        "moco_v2": 2, "moco_v3": 2, "byol": 2, "barlow_twins": 2, "mae": 1}


@pytest.mark.parametrize("name", list(SMALL_HEADS))
def test_forward_backward_and_the_backbone_the_trainer_exports(name):
    model = tiny_method(name)
    assert isinstance(model.backbone, VisionTransformer)
    out = model(views_for(model))
    assert out["loss"].ndim == 0 and math.isfinite(out["loss"].item())
    out["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(model.get_parameter(n).grad is not None for n in trainable)
    with pytest.raises(ValueError, match="views"):
        model(views_for(model)[:1] * (3 - model.num_views))


@pytest.mark.parametrize("name,backbone", [("mae", "vit"), ("byol", "vit"), ("barlow_twins", "resnet")])
def test_activation_checkpointing_recomputes_the_same_loss_and_gradients(name, backbone):
    """train.activation_checkpointing: the blocks run again in backward (timm's checkpoint_seq, also
    inside MAE's own encoder loop); loss and every gradient are what the stored activations give."""
    from ssl_foundry.pipeline.config import load_config
    from ssl_foundry.pipeline.train.trainer import build_model

    results = []
    for checkpointing in (False, True):
        overrides = [f"model.method={name}", f"model.method_args={SMALL_HEADS[name]}",
                     f"train.activation_checkpointing={checkpointing}"]
        overrides += (["model.backbone=vit_tiny_patch16_224", f"model.backbone_args={VIT_ARGS}"] if backbone == "vit"
                      else ["model.backbone=resnet18", "model.backbone_args={}"])
        if name == "mae":
            overrides.append("data.views=[{count: 1, ops: [{op: random_resized_crop, args: {size: 16}}]}]")
        torch.manual_seed(0)
        model = build_model(load_config("configs/simclr_resnet18_fmnist.yaml", overrides, check_paths=False)).train()
        assert model.backbone.grad_checkpointing is checkpointing
        first_block = model.backbone.blocks[0] if backbone == "vit" else model.backbone.layer1[0]
        calls = []
        first_block.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop early
        torch.manual_seed(3)  # MAE's masks
        loss = model(views_for(model))["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        len(calls)))
    (plain_loss, plain_grads, plain_calls), (ckpt_loss, ckpt_grads, ckpt_calls) = results
    assert ckpt_calls == 2 * plain_calls  # every call of the block ran again in backward
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain_grads.keys() == ckpt_grads.keys()
    for n in plain_grads:
        torch.testing.assert_close(ckpt_grads[n], plain_grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_simclr_without_a_projector_contrasts_the_backbone_features():
    """proj_layers=0: the paper's "no projection" (Chen et al. 2020, Fig. 8), NT-Xent on f(x) itself."""
    from ssl_foundry.models.losses import nt_xent_loss

    torch.manual_seed(0)
    backbone = create_backbone("resnet18")
    model = create_method("simclr", backbone, proj_layers=0, temperature=0.1).train()
    assert isinstance(model.projector, nn.Identity)
    views = views_for(model)
    h1, h2 = backbone(torch.cat(views)).chunk(2)
    torch.testing.assert_close(model(views)["loss"], nt_xent_loss(h1, h2, 0.1))


# ----------------------------------------------------------------------------- momentum


def test_cosine_momentum_schedule_values():
    m0, total = 0.99, 100
    assert cosine_momentum(0, total, m0) == pytest.approx(m0)
    assert cosine_momentum(total // 2, total, m0) == pytest.approx((1 + m0) / 2)
    assert cosine_momentum(total, total, m0) == pytest.approx(1.0)
    assert cosine_momentum(25, total, m0) == pytest.approx(1 - (1 - m0) * (math.cos(math.pi / 4) + 1) / 2)
    values = [cosine_momentum(k, total, m0) for k in range(total + 1)]
    assert values == sorted(values)
    assert cosine_momentum(-5, total, m0) == pytest.approx(m0) and cosine_momentum(500, total, m0) == 1.0


def test_momentum_encoder_update_is_the_ema_and_never_has_gradients():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    target = MomentumEncoder(online)
    assert all(not p.requires_grad for p in target.parameters())
    before = [p.clone() for p in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    target.update(online, 0.9)
    for old, new, theta in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * theta)
    x = torch.randn(5, 3, requires_grad=True)
    assert not target(x).requires_grad
    target.update(online, 0.0)  # m = 0 copies the online weights
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_gets_no_gradient_is_not_optimized_and_is_checkpointed(name):
    model = tiny_method(name)
    target = getattr(model, TARGETS[name])
    target_ids = {id(p) for p in target.parameters()}
    model(views_for(model))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())

    cfg = Config()
    cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay = "sgd", 0.5, 1e-4
    optimizer = build_optimizer(cfg, model)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimized & target_ids
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    keys = model.state_dict().keys()
    assert {f"{TARGETS[name]}.module.{k}" for k in target.module.state_dict()} <= set(keys)

    # one trainer step: optimizer.step(), then the hook with the number of steps done
    old_target = [p.clone() for p in target.parameters()]
    optimizer.step()
    model.on_step_end(1, 10)
    m = model.momentum if name == "moco_v2" else model.base_momentum  # cosine schedule at step 0 = base
    online = (model._query_encoder() if name == "moco_v2" else
              model._base_encoder() if name == "moco_v3" else model._online_encoder())
    changed = 0
    for old, new, theta in zip(old_target, target.parameters(), online.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * theta)
        changed += not torch.equal(new, old)
    assert changed > 0

    restored = tiny_method(name)
    restored.load_state_dict(model.state_dict())
    for a, b in zip(getattr(restored, TARGETS[name]).parameters(), target.parameters()):
        assert torch.equal(a, b)


def test_momentum_schedule_through_the_hook():
    model = tiny_method("byol", momentum=0.9)
    total = 5
    seen = []
    original = model.target.update
    model.target.update = lambda online, m: (seen.append(m), original(online, m))
    for step in range(1, total + 1):  # the trainer calls the hook with steps done: 1..total
        model.on_step_end(step, total)
    assert seen == pytest.approx([cosine_momentum(k, total, 0.9) for k in range(total)])
    assert seen[0] == pytest.approx(0.9)


# ----------------------------------------------------------------------------- MoCo v2 queue


def test_queue_pointer_and_wrap_around():
    queue = KeyQueue(size=8, dim=2)
    assert queue.ptr.item() == 0 and torch.allclose(queue.keys.norm(dim=1), torch.ones(8))
    a, b, c = (torch.full((4, 2), float(v)) for v in (1, 2, 3))
    queue.enqueue(a)
    assert queue.ptr.item() == 4 and torch.equal(queue.keys[:4], a)
    queue.enqueue(b)
    assert queue.ptr.item() == 0 and torch.equal(queue.keys, torch.cat([a, b]))  # wrapped
    queue.enqueue(c)  # the oldest keys (a) are replaced first
    assert queue.ptr.item() == 4 and torch.equal(queue.keys, torch.cat([c, b]))
    for step in range(4):  # batches of 2: 4 more enqueues go round once
        queue.enqueue(torch.full((2, 2), 10.0 + step))
    assert queue.ptr.item() == 4
    assert queue.keys[:, 0].tolist() == [12, 12, 13, 13, 10, 10, 11, 11]
    with pytest.raises(ValueError, match="not a multiple"):
        queue.enqueue(torch.zeros(3, 2))
    assert {"keys", "ptr"} <= set(queue.state_dict())


def test_moco_v2_forward_uses_the_old_queue_then_enqueues_its_keys():
    model = tiny_method("moco_v2")
    x_q, x_k = views_for(model)
    old_queue = model.queue.keys.clone()
    torch.manual_seed(5)
    loss = model([x_q, x_k])["loss"]
    torch.manual_seed(5)  # same shuffle permutation
    k = model.encode_keys(x_k)
    q = model.projector(model.backbone(x_q))
    torch.testing.assert_close(loss, info_nce_loss(q, k, old_queue, model.temperature))
    assert model.queue.ptr.item() == 8
    torch.testing.assert_close(model.queue.keys[:8], k)
    torch.testing.assert_close(model.queue.keys[8:], old_queue[8:])


def test_batch_shuffle_and_unshuffle_on_one_process():
    x = torch.arange(10.0).unsqueeze(1)
    torch.manual_seed(3)
    shuffled, unshuffle = batch_shuffle(x)
    torch.manual_seed(3)
    perm = torch.randperm(10)
    assert torch.equal(shuffled, x[perm]) and not torch.equal(shuffled, x)
    assert torch.equal(batch_unshuffle(shuffled, unshuffle), x)


def keys_by_hand(model, x: torch.Tensor, seed: int, groups: int) -> torch.Tensor:
    """MoCo's single-process shuffle-BN by hand: the permutation ``encode_keys`` draws after
    ``manual_seed(seed)``, the key encoder on each BatchNorm group of the shuffled batch, unshuffled."""
    torch.manual_seed(seed)
    perm = torch.randperm(x.shape[0])
    with torch.no_grad():
        keys = torch.cat([model.key_encoder(part) for part in x[perm].tensor_split(groups)])
    return F.normalize(keys, dim=1)[torch.argsort(perm)]


def test_shuffle_bn_single_process_fallback():
    """Keys are computed on a shuffled batch cut into BatchNorm groups, and come back in order."""
    model = tiny_method("moco_v2", backbone="resnet", shuffle_bn_splits=2)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    keys = model.encode_keys(x)
    expected = keys_by_hand(model, x, seed=7, groups=2)
    torch.testing.assert_close(keys, expected)
    # one BN group: the permutation must cancel exactly (BN statistics are order-free)
    model.shuffle_bn_splits = 1
    with torch.no_grad():
        plain = F.normalize(model.key_encoder(x), dim=1)
    torch.testing.assert_close(model.encode_keys(x), plain, rtol=1e-5, atol=1e-6)
    # ... and BN groups really change the keys (this is what shuffling BN is about)
    assert not torch.allclose(expected, plain, atol=1e-4)
    # default on one process: 8 groups, capped so each has at least 2 samples
    model.shuffle_bn_splits = None
    torch.manual_seed(7)
    torch.testing.assert_close(model.encode_keys(x), keys_by_hand(model, x, seed=7, groups=4))


# ----------------------------------------------------------------------------- MoCo v3 options


def test_moco_v3_vit_options_and_paper_heads():
    model = tiny_method("moco_v3", fixed_pos_embed=True, freeze_patch_embed=True)
    vit = model.backbone
    fixed = sincos_pos_embed(vit.patch_embed.grid_size, vit.embed_dim, vit.num_prefix_tokens)
    assert torch.equal(vit.pos_embed.detach(), fixed) and not vit.pos_embed.requires_grad
    assert not any(p.requires_grad for p in vit.patch_embed.proj.parameters())
    model(views_for(model))["loss"].backward()
    assert vit.pos_embed.grad is None and vit.patch_embed.proj.weight.grad is None
    linear_layers = lambda head: sum(isinstance(m, nn.Linear) for m in head)  # noqa: E731
    assert linear_layers(model.projector) == 3 and linear_layers(model.predictor) == 2  # ViT: 3-layer projector
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    assert linear_layers(tiny_method("moco_v3", backbone="resnet").projector) == 2  # ResNet: 2 layers
    with pytest.raises(ValueError, match="ViT"):
        tiny_method("moco_v3", backbone="resnet", freeze_patch_embed=True)


# ----------------------------------------------------------------------------- MAE


@pytest.mark.parametrize("length,ratio", [(16, 0.75), (49, 0.75), (10, 0.5), (7, 0.3), (12, 0.0), (9, 0.9)])
def test_random_masking_keeps_round_of_visible_tokens_and_unshuffle_restores_order(length, ratio):
    n, dim = 4, 3
    x = torch.randn(n, length, dim)
    visible, mask, ids_restore = random_masking(x, ratio)
    keep = round((1 - ratio) * length)
    assert visible.shape == (n, keep, dim)
    assert mask.sum(dim=1).tolist() == [float(length - keep)] * n
    for b in range(n):
        kept_positions = (mask[b] == 0).nonzero().flatten().tolist()
        # the visible tokens are exactly the unmasked ones (as a set, in shuffled order)
        got = sorted(visible[b].tolist())
        assert got == sorted(x[b, kept_positions].tolist())
    # appending placeholders for the removed tokens and gathering with ids_restore puts every
    # visible token back at its original position
    filled = torch.cat([visible, torch.full((n, length - keep, dim), float("nan"))], dim=1)
    restored = torch.gather(filled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    assert torch.equal(restored[mask == 0], x[mask == 0])
    assert torch.isnan(restored[mask == 1]).all()


def test_masks_differ_per_sample_and_follow_the_noise():
    x = torch.randn(2, 6, 1)
    noise = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7], [0.9, 0.1, 0.8, 0.2, 0.7, 0.3]])
    visible, mask, _ = random_masking(x, 0.5, noise)
    assert mask.tolist() == [[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]]
    assert torch.equal(visible[0, :, 0], x[0, [0, 2, 4], 0]) and torch.equal(visible[1, :, 0], x[1, [1, 3, 5], 0])


def test_patchify_round_trip():
    imgs = torch.randn(2, 3, 8, 12)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 6, 48)
    assert torch.equal(patches[0, 1], imgs[0, :, 0:4, 4:8].permute(1, 2, 0).flatten())  # row-major patches
    assert torch.equal(unpatchify(patches, 4, 3, (2, 3)), imgs)


def test_mae_encoder_sees_visible_tokens_only_and_exports_a_plain_timm_vit():
    model = tiny_method("mae")  # 16 px, patch 4: L = 16, 4 visible at ratio 0.75
    seen = []
    model.backbone.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    out = model(views_for(model, batch=3))
    assert seen == [torch.Size([3, 1 + 4, model.backbone.embed_dim])]
    assert out["pred"].shape == (3, 16, 4 * 4 * 3) and out["mask"].sum().item() == 3 * 12
    assert not model.backbone.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **VIT_ARGS)
    plain.load_state_dict(model.backbone.state_dict(), strict=True)
    assert type(model.backbone) is type(plain) is VisionTransformer
    x = views_for(model, batch=2)[0]
    model.eval(), plain.eval()
    torch.testing.assert_close(plain(x), model.backbone(x))


def identity_mae(mask_ratio: float) -> nn.Module:
    """A hand-built MAE whose encoder and decoder pass patch pixels through unchanged: patch
    embedding = identity on each patch's pixels, blocks with zeroed residual branches, no norms,
    zero position embeddings, identity decoder projections, zero mask token."""
    torch.manual_seed(0)
    p, c = 4, 3
    dim = p * p * c
    vit = create_backbone("vit_tiny_patch16_224", img_size=8, patch_size=p, embed_dim=dim, depth=1, num_heads=3)
    model = create_method("mae", vit, mask_ratio=mask_ratio, decoder_embed_dim=dim, decoder_depth=1,
                          decoder_num_heads=3, norm_pix_loss=False)
    with torch.no_grad():
        weight = torch.zeros(dim, c, p, p)
        for i in range(p):
            for j in range(p):
                for ch in range(c):
                    weight[(i * p + j) * c + ch, ch, i, j] = 1.0
        vit.patch_embed.proj.weight.copy_(weight)
        vit.patch_embed.proj.bias.zero_()
        vit.pos_embed.zero_()
        model.decoder_pos_embed.zero_()
        model.mask_token.zero_()
        for block in [*vit.blocks, *model.decoder_blocks]:
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        for linear in (model.decoder_embed, model.decoder_pred):
            linear.weight.copy_(torch.eye(dim))
            linear.bias.zero_()
    vit.norm = nn.Identity()
    model.decoder_norm = nn.Identity()
    return model.eval()


def test_mae_mask_ratio_zero_reconstructs_trivially_in_hand_built_case():
    imgs = torch.randn(2, 3, 8, 8)
    model = identity_mae(mask_ratio=0.0)
    out = model([imgs])
    assert out["mask"].sum() == 0
    torch.testing.assert_close(out["pred"], patchify(imgs, 4))  # every patch back at its place
    assert out["loss"].item() == 0.0


def test_mae_loss_counts_masked_patches_only_in_hand_built_case():
    imgs = torch.randn(3, 3, 8, 8)
    model = identity_mae(mask_ratio=0.5)
    torch.manual_seed(1)
    out = model([imgs])
    target, mask = patchify(imgs, 4), out["mask"]
    assert mask.sum(dim=1).tolist() == [2.0, 2.0, 2.0]
    visible = mask == 0
    torch.testing.assert_close(out["pred"][visible], target[visible])  # visible patches pass through
    assert torch.equal(out["pred"][~visible], torch.zeros_like(target[~visible]))  # masked: the zero mask token
    expected = (target[~visible] ** 2).mean()  # error of predicting 0 on the masked patches only
    torch.testing.assert_close(out["loss"], expected)
