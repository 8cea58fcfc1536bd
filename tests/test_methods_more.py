"""SwAV, VICReg, SimSiam, NNCLR and feature distillation as modules (single process), and the fidelity
fixes of MoCo v3 (ViT init, predictor BN) and colorization (float64 counts): multi-crop batching,
Sinkhorn codes with the queue, prototype normalisation and freezing, the support set, stop-gradients,
the frozen teacher, and what the trainer relies on (state_dict, on_step_end, optimizer groups)."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.multicrop import forward_by_resolution
from ssl_foundry.models.losses import (negative_cosine_loss, nnclr_loss, sinkhorn_knopp, smooth_l1_distillation_loss,
                                       swapped_prediction_loss, vicreg_loss)
from ssl_foundry.models.registry import create_method, method_arg_names, takes_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

VIT_ARGS = {"img_size": 16, "patch_size": 8, "depth": 2}


def vit(**extra) -> nn.Module:
    return create_backbone("vit_tiny_patch16_224", **VIT_ARGS, **extra)


def images(*sizes: int, batch: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for size in sizes]


def swav(**overrides) -> nn.Module:
    torch.manual_seed(0)
    args = dict(proj_hidden_dim=32, proj_out_dim=16, num_prototypes=12, freeze_prototypes_steps=0)
    return create_method("swav", vit(dynamic_img_size=True), **{**args, **overrides}).train()


# ----------------------------------------------------------------------------- SwAV


def test_multicrop_views_go_through_the_backbone_once_per_resolution():
    net = vit(dynamic_img_size=True).eval()
    calls = []
    net.register_forward_hook(lambda module, inputs, out: calls.append(tuple(inputs[0].shape)))
    views = images(16, 16, 8, 8, 8)
    features = forward_by_resolution(net, views)
    assert calls == [(12, 3, 16, 16), (18, 3, 8, 8)]
    with torch.no_grad():
        one_by_one = torch.cat([net(v) for v in views])
    torch.testing.assert_close(features, one_by_one, rtol=1e-5, atol=1e-5)


def test_swav_loss_is_the_swapped_prediction_of_sinkhorn_codes_over_all_crops():
    model = swav()
    views = images(16, 16, 8, 8)
    out = model(views)
    out["loss"].backward()
    with torch.no_grad():
        z = F.normalize(model.projector(forward_by_resolution(model.backbone, views)), dim=1)
        scores = list((z @ model.prototypes.weight.T).split(6))
        codes = [sinkhorn_knopp(scores[v], 0.05, 3) for v in (0, 1)]
    torch.testing.assert_close(out["loss"], swapped_prediction_loss(scores, codes, [0, 1], 0.1))
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert torch.equal(model.steps_done, torch.tensor(0)) and "steps_done" in model.state_dict()
    with pytest.raises(ValueError, match="SwAV takes 2 global views.*got 1.*data.views"):
        model(views[:1])


def test_swav_prototypes_stay_on_the_unit_sphere_and_are_frozen_at_first():
    model = swav(freeze_prototypes_steps=2)
    torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    grads = []
    for step in range(1, 4):
        optimizer.zero_grad()
        model(images(16, 16, 8, seed=step))["loss"].backward()
        grads.append(model.prototypes.weight.grad.abs().sum().item())
        before = model.prototypes.weight.detach().clone()
        optimizer.step()
        model.on_step_end(step, 10)
        torch.testing.assert_close(model.prototypes.weight.norm(dim=1), torch.ones(12))  # renormalised
        assert int(model.steps_done) == step
        frozen = step <= 2  # renormalising a unit vector moves it by rounding only
        assert torch.allclose(model.prototypes.weight.detach(), before, rtol=0, atol=1e-6) == frozen
    assert grads[0] == grads[1] == 0.0 and grads[2] > 0  # a zero gradient, then a real one


def test_swav_queue_starts_late_fills_and_is_used_once_full():
    batch = 6
    model = swav(queue_size=2 * batch, queue_start_step=1)
    views = images(16, 16, 8, batch=batch)
    model(views)  # step 0: before queue_start_step, nothing is queued
    assert not model.queues[0].keys.any()
    model.on_step_end(1, 10)
    for fill in range(2):  # two batches fill each queue with the assignment views' embeddings
        seen = {}
        hooks = [model.projector.register_forward_hook(lambda m, i, o: seen.update(z=F.normalize(o.detach(), dim=1)))]
        model(views)
        hooks[0].remove()
        torch.testing.assert_close(model.queues[0].keys[fill * batch:(fill + 1) * batch], seen["z"][:batch])
        torch.testing.assert_close(model.queues[1].keys[fill * batch:(fill + 1) * batch], seen["z"][batch:2 * batch])
    assert all(q.full for q in model.queues)
    # the next forward solves Sinkhorn-Knopp over [queue; batch] (the queue read before this batch joins it)
    queued = model.queues[0].keys.clone()
    with torch.no_grad():
        z = F.normalize(model.projector(forward_by_resolution(model.backbone, views)), dim=1)
        scores = list((z @ model.prototypes.weight.T).split(batch))
        expected_codes = sinkhorn_knopp(scores[0], 0.05, 3, queued @ model.prototypes.weight.T)
    got = []
    original = model.codes
    model.codes = lambda *args: got.append(original(*args)) or got[-1]
    model(views)
    torch.testing.assert_close(got[0], expected_codes)


# ----------------------------------------------------------------------------- VICReg, SimSiam


def test_vicreg_forward_is_the_loss_of_both_views_embeddings():
    torch.manual_seed(0)
    model = create_method("vicreg", vit(), proj_hidden_dim=32, proj_out_dim=16, sim_coeff=2.0).train()
    views = images(16, 16)
    out = model(views)
    z1, z2 = (model.projector(model.backbone(v)) for v in views)
    torch.testing.assert_close(out["loss"], vicreg_loss(z1, z2, 2.0, 25.0, 1.0))


def test_simsiam_heads_stop_gradient_and_fixed_lr_predictor():
    torch.manual_seed(0)
    model = create_method("simsiam", vit(), proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=8).train()
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    assert sum(isinstance(m, nn.Linear) for m in model.projector) == 3
    views = images(16, 16)
    out = model(views)
    z1, z2 = (model.projector(model.backbone(v)) for v in views)
    expected = (negative_cosine_loss(model.predictor(z1), z2) + negative_cosine_loss(model.predictor(z2), z1)) / 2
    torch.testing.assert_close(out["loss"], expected)
    assert model.fixed_lr_modules == ("predictor",)
    assert create_method("simsiam", vit(), fix_predictor_lr=False).fixed_lr_modules == ()


# ----------------------------------------------------------------------------- NNCLR


def test_nnclr_positives_are_nearest_neighbours_from_the_support_set_then_enqueued():
    torch.manual_seed(0)
    model = create_method("nnclr", vit(), proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32,
                          queue_size=12, temperature=0.1).train()
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and model.projector[-1].affine  # BN after every layer
    support = model.support_set.keys.clone()
    views = images(16, 16)
    torch.manual_seed(5)
    out = model(views)
    z1, z2 = (model.projector(model.backbone(v)) for v in views)
    p1, p2 = model.predictor(z1), model.predictor(z2)
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    nearest1, nearest2 = (support[(z @ support.T).argmax(dim=1)] for z in (z1, z2))
    torch.testing.assert_close(out["loss"], (nnclr_loss(nearest1, p2, 0.1) + nnclr_loss(nearest2, p1, 0.1)) / 2)
    torch.testing.assert_close(model.support_set.keys[:6], z1.detach())  # the first view's embeddings
    torch.testing.assert_close(model.support_set.keys[6:], support[6:])
    torch.testing.assert_close(model.nearest_neighbour(z1), z1.detach())  # now in Q: its own neighbour
    out["loss"].backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0  # through the predictions


# ----------------------------------------------------------------------------- distillation


def test_distill_takes_a_frozen_teacher_and_projects_when_widths_differ():
    assert takes_teacher("distill") and "teacher" not in method_arg_names("distill")
    teacher = create_backbone("resnet10t")  # 512 features; the student ViT-Tiny has 192
    torch.manual_seed(0)
    model = create_method("distill", vit(), teacher=teacher, loss="smooth_l1").train()
    assert not model.teacher.training and isinstance(model.projector, nn.Linear)
    assert (model.projector.in_features, model.projector.out_features) == (192, 512)
    x = images(16)
    out = model(x)
    with torch.no_grad():
        target = teacher(x[0])
    torch.testing.assert_close(out["loss"], smooth_l1_distillation_loss(model.projector(model.backbone(x[0])), target))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.backbone.blocks[0].attn.qkv.weight.grad is not None
    assert {k for k in model.state_dict() if k.startswith("teacher.")}  # checkpointed with the student
    same_width = create_method("distill", vit(), teacher=vit())
    assert isinstance(same_width.projector, nn.Identity)
    with pytest.raises(ValueError, match="needs a teacher network"):
        create_method("distill", vit())
    with pytest.raises(ValueError, match="loss 'l2'"):
        create_method("distill", vit(), teacher=vit(), loss="l2")


# ----------------------------------------------------------------------------- MoCo v3, colorization


def test_moco_v3_vit_is_initialised_as_the_official_code():
    torch.manual_seed(0)
    model = create_method("moco_v3", vit(), proj_hidden_dim=32, proj_out_dim=16, pred_hidden_dim=32)
    backbone, dim = model.backbone, 192
    qkv = backbone.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= math.sqrt(6 / (dim + dim)) and qkv.abs().max() > 0.9 * math.sqrt(6 / (dim + dim))
    fc1 = backbone.blocks[0].mlp.fc1.weight  # xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    assert fc1.abs().max() <= math.sqrt(6 / (dim + 4 * dim)) and fc1.abs().max() > 0.9 * math.sqrt(6 / (5 * dim))
    proj, bound = backbone.patch_embed.proj.weight, math.sqrt(6 / (3 * 8 * 8 + dim))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.9 * bound
    assert not backbone.blocks[1].attn.proj.bias.any() and backbone.cls_token.std() < 1e-5
    assert isinstance(model.predictor[-1], nn.BatchNorm1d) and not model.predictor[-1].affine  # ViT: BN at the end
    resnet = create_method("moco_v3", create_backbone("resnet10t"), proj_hidden_dim=32, proj_out_dim=16,
                           pred_hidden_dim=32)
    assert isinstance(resnet.predictor[-1], nn.Linear)  # ResNet: no BN after the predictor


def test_colorization_counts_are_float64_and_accumulate_every_batch():
    torch.manual_seed(0)
    model = create_method("colorization", create_backbone("resnet10t")).train()
    assert model.bin_counts.dtype == torch.float64
    x = images(32, batch=2)
    model(x)
    first = model.bin_counts.clone()
    # one unit of soft target per output pixel (8 x 8 per image), each a float32 sum of 5 bins
    assert first.sum().item() == pytest.approx(2 * 8 * 8, rel=5 * 2 ** -23)
    model(x)
    torch.testing.assert_close(model.bin_counts, 2 * first)
    model.eval()(x)
    torch.testing.assert_close(model.bin_counts, 2 * first)  # eval does not count


def test_distill_export_is_a_plain_timm_student():
    torch.manual_seed(0)
    model = create_method("distill", create_backbone("resnet10t"), teacher=vit())
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    plain.load_state_dict(model.backbone.state_dict(), strict=True)
