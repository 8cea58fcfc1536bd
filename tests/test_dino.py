"""Multi-crop, DINO and iBOT / DINOv2-style on one process: the losses against their papers'
formulas (hand-worked cases and plain loops), the head, the centre and the schedules, blockwise
masking, what the methods compute and train, and the config rules a multi-crop recipe must follow.
The cross-rank parts are in test_distributed_dino.py, training through the CLI in test_pretrain_dino.py."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.heads import DINOHead
from ssl_foundry.models.losses import dino_loss, ibot_patch_loss, koleo_loss, sinkhorn_knopp
from ssl_foundry.models.methods.dino import TeacherCenter, teacher_temperature
from ssl_foundry.models.methods.ibot import BlockMasking, sample_masks
from ssl_foundry.models.momentum import cosine_momentum
from ssl_foundry.models.multicrop import forward_by_resolution, resolution_groups
from ssl_foundry.models.registry import create_method
from ssl_foundry.pipeline.config import Config, ConfigError, DataConfig, build, load_config
from ssl_foundry.pipeline.data.augment.spec import view_sizes
from ssl_foundry.pipeline.train.optim import build_optimizer, cosine_weight_decay
from ssl_foundry.pipeline.train.trainer import build_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

DINO_RECIPE, IBOT_RECIPE = "configs/dino_vit_tiny_fmnist.yaml", "configs/ibot_vit_tiny_fmnist.yaml"
VIT_ARGS = {"img_size": 16, "patch_size": 4, "depth": 2, "dynamic_img_size": True}
HEADS = {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16}


def vit(**overrides) -> nn.Module:
    return create_backbone("vit_tiny_patch16_224", **{**VIT_ARGS, **overrides})


def tiny(method: str, backbone: nn.Module | None = None, **args) -> nn.Module:
    torch.manual_seed(0)
    extra = {"patch_out_dim": 32} if method == "ibot" else {}
    return create_method(method, backbone or vit(), **{**HEADS, **extra, **args}).train()


def multi_crop_views(batch: int = 4, local_sizes=(8, 8), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [16, 16, *local_sizes]
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


# ----------------------------------------------------------------------------- multi-crop helpers


def test_resolution_groups_are_runs_of_consecutive_same_size_views():
    views = [torch.zeros(2, 3, s, s) for s in (16, 16, 8, 8, 12, 8)]
    assert [[v.shape[-1] for v in g] for g in resolution_groups(views)] == [[16, 16], [8, 8], [12], [8]]


def test_forward_by_resolution_is_one_call_per_group_with_outputs_in_view_order():
    torch.manual_seed(0)
    net = vit().eval()  # LayerNorm only: a sample's output does not depend on its batch
    views = multi_crop_views(local_sizes=(8, 8, 12))
    calls = []
    net.register_forward_hook(lambda module, inputs, output: calls.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        out = forward_by_resolution(net, views)
        separate = torch.cat([net(v) for v in views])
    assert calls[:3] == [(8, 3, 16, 16), (8, 3, 8, 8), (4, 3, 12, 12)]
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-5)


def test_view_sizes_are_those_of_the_last_resizing_op():
    cfg = load_config(DINO_RECIPE, check_paths=False)
    assert view_sizes(cfg.data.views) == [(32, 32)] * 2 + [(16, 16)] * 6
    views = build(DataConfig, {"views": [{"count": 2, "ops": [{"op": "resize", "args": {"size": 20}},
                                                              {"op": "center_crop", "args": {"size": [12, 10]}}]},
                                         {"count": 1, "ops": [{"op": "grayscale"}]}]}).views
    assert view_sizes(views) == [(12, 10), (12, 10), None]


@pytest.mark.parametrize("overrides,message", [
    (["model.backbone_args={img_size: 32, patch_size: 4}"],
     "views of several sizes \\(16x16, 32x32\\) but the ViT takes one: set model.backbone_args.dynamic_img_size=true"),
    (["model.backbone_args={img_size: 32, patch_size: 5, dynamic_img_size: true}"],
     "16x16, 32x32 are not multiples of the ViT's 5x5 patches"),
    (["data.views=[{count: 1, ops: [{op: resize, args: {size: 32}}]}]"], "data.views: method 'dino' takes 2 global view\\(s\\) first.*makes 1"),
    (["data.views=[{count: 1, ops: [{op: resize, args: {size: 32}}]}, {count: 1, ops: [{op: resize, args: {size: 16}}]}]"],
     "the first 2 views are the global ones and must have one size"),
    (["train.weight_decay=0"], "train.weight_decay_end=0.4: .*weight_decay must be > 0"),
    (["train.weight_decay_end=-0.1"], "weight_decay_end must be >= 0"),
])
def test_multi_crop_config_errors_name_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DINO_RECIPE, overrides, check_paths=False)


def test_multi_crop_recipes_accept_any_number_of_local_views_and_a_cnn_any_sizes():
    assert load_config(DINO_RECIPE, ["data.views=[{count: 2, ops: [{op: resize, args: {size: 32}}]}]"],
                       check_paths=False).model.method == "dino"  # no local views: DINO without multi-crop
    cfg = load_config(DINO_RECIPE, ["model.backbone=resnet10t", "model.backbone_args={}"], check_paths=False)
    assert cfg.model.backbone == "resnet10t"
    assert load_config(DINO_RECIPE, ["train.weight_decay_end=null"], check_paths=False).train.weight_decay_end is None


# ----------------------------------------------------------------------------- losses


def log_softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    log_z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - log_z for x in row]


def reference_dino_loss(student, teacher_probs, t_s) -> float:
    """Eq. 3 of DINO as loops: every (teacher global i, student view v != i) pair, batch-averaged."""
    total, terms = 0.0, 0
    for i, t in enumerate(teacher_probs):
        for v, s in enumerate(student):
            if v == i:
                continue
            total += sum(-sum(p * q for p, q in zip(t[b].tolist(), log_softmax_row((s[b] / t_s).tolist())))
                         for b in range(s.shape[0])) / s.shape[0]
            terms += 1
    return total / terms


@pytest.mark.parametrize("views,batch,k,t_s", [(2, 3, 5, 0.1), (6, 2, 7, 0.1), (4, 4, 3, 0.5)])
def test_dino_loss_matches_the_loop_reference(views, batch, k, t_s):
    g = torch.Generator().manual_seed(views)
    student = [torch.randn(batch, k, generator=g, dtype=torch.float64) for _ in range(views)]
    teacher = [F.softmax(torch.randn(batch, k, generator=g, dtype=torch.float64), dim=-1) for _ in range(2)]
    got = dino_loss([s.float() for s in student], [t.float() for t in teacher], t_s).item()
    assert got == pytest.approx(reference_dino_loss(student, teacher, t_s), rel=1e-5)


def test_dino_loss_hand_worked_case():
    # K = 2, t_s = 1; teacher of global 0: (1, 0), of global 1: (0, 1); student logits (a_v, 0) for
    # views a = (0, ln 3, ln 3): log p = (a - ln(1 + e^a), -ln(1 + e^a)).
    # pairs: (t0, s1): -ln(3/4); (t0, s2): -ln(3/4); (t1, s0): ln 2; (t1, s2): ln 4 -> mean
    student = [torch.tensor([[a, 0.0]]) for a in (0.0, math.log(3), math.log(3))]
    teacher = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    expected = (2 * -math.log(0.75) + math.log(2) + math.log(4)) / 4
    assert dino_loss(student, teacher, student_temp=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_trains_the_student_only():
    student = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    teacher_logits = torch.randn(2, 3, 4, requires_grad=True)
    dino_loss(student, list(F.softmax(teacher_logits, dim=-1))).backward()
    assert all(s.grad.abs().sum() > 0 for s in student)
    assert teacher_logits.grad is None  # the teacher's targets are constants of the loss


def test_ibot_patch_loss_hand_worked_case():
    # 3 views of 2 patches; masked: view 0 patch 0, view 2 both patches (view 1: none).
    masks = torch.tensor([[True, False], [False, False], [True, True]])
    # uniform student over K = 2 at t_s = 1: every masked patch costs ln 2 whatever the teacher
    student = torch.zeros(3, 2)
    teacher = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    # view 0: ln 2; view 1: 0 (no masked patch, still counted); view 2: mean(ln 2, ln 2) -> (2 ln 2) / 3
    assert ibot_patch_loss(student, teacher, masks, 1.0).item() == pytest.approx(2 * math.log(2) / 3, rel=1e-6)
    # a confident, right student on view 0's patch: that view's term drops to -log p of the teacher's class
    student = torch.tensor([[math.log(9), 0.0], [0.0, 0.0], [0.0, 0.0]])  # p = (0.9, 0.1)
    expected = (-math.log(0.9) + 0 + math.log(2)) / 3
    assert ibot_patch_loss(student, teacher, masks, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_hand_worked_case_and_scale_invariance():
    # unit vectors at 0, 90 and 180 degrees: every nearest neighbour is at distance sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    assert koleo_loss(5 * x).item() == pytest.approx(koleo_loss(x).item(), rel=1e-6)  # L2-normalised first
    # 4 points: the pair close together dominates; neighbours 0<->1 (distance d), 2<->3 (sqrt 2)
    angle = 0.1
    y = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [0.0, -1.0], [-1.0, 0.0]])
    d = 2 * math.sin(angle / 2)
    expected = -(2 * math.log(d) + 2 * math.log(math.sqrt(2))) / 4
    assert koleo_loss(y).item() == pytest.approx(expected, rel=1e-5)
    y.requires_grad_(True)
    koleo_loss(y).backward()
    assert y.grad[0] @ torch.tensor([0.0, 1.0]) > 0  # descent moves x_0 away from x_1 (towards -y)


def reference_sinkhorn(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """SwAV's Algorithm 1 (distributed_sinkhorn) on one process, numpy float64."""
    q = np.exp(scores / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def test_sinkhorn_knopp_matches_the_reference_and_balances_the_prototypes():
    scores = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    got = sinkhorn_knopp(scores, epsilon=0.5, iterations=3)
    torch.testing.assert_close(got.double(), torch.from_numpy(reference_sinkhorn(scores.double().numpy(), 0.5, 3)),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(12))  # each sample: an assignment
    converged = sinkhorn_knopp(scores, epsilon=0.5, iterations=500)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((5,), 12 / 5), rtol=1e-4, atol=1e-4)  # equipartition
    # the optimum has the form Diag(u) exp(C / eps) Diag(v): log Q - C / eps = a_i + b_j
    residual = converged.double().log() - scores.double() / 0.5
    centred = residual - residual.mean(dim=1, keepdim=True) - residual.mean(dim=0, keepdim=True) + residual.mean()
    assert centred.abs().max() < 1e-4
    uniform = sinkhorn_knopp(torch.zeros(4, 8), epsilon=0.1)
    torch.testing.assert_close(uniform, torch.full((4, 8), 1 / 8))


# ----------------------------------------------------------------------------- centre, head, schedules


def test_teacher_center_is_the_ema_of_the_batch_mean():
    center = TeacherCenter(3, momentum=0.9)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = center.probs(logits, 0.5)
    torch.testing.assert_close(probs, F.softmax(logits / 0.5, dim=-1))  # c = 0 at first
    center.update(logits)
    torch.testing.assert_close(center.center, 0.1 * torch.tensor([[2.0, 2.0, 2.0]]))
    center.update(torch.tensor([[0.0, 0.0, 10.0]]))
    torch.testing.assert_close(center.center, 0.9 * torch.tensor([[0.2, 0.2, 0.2]]) + 0.1 * torch.tensor([[0., 0., 10.]]))
    torch.testing.assert_close(center.probs(logits, 0.5), F.softmax((logits - center.center) / 0.5, dim=-1))
    before = center.center.clone()
    center.update(torch.zeros(0, 3))  # no rows (no masked patch anywhere): the centre stays
    assert torch.equal(center.center, before)


def test_teacher_temperature_warms_up_like_np_linspace():
    assert [teacher_temperature(k, 5, 0.04, 0.07) for k in range(7)] == pytest.approx(
        list(np.linspace(0.04, 0.07, 5)) + [0.07, 0.07])
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07 and teacher_temperature(0, 1, 0.04, 0.07) == 0.04


def test_dino_head_layers_normalisation_and_weight_normalised_last_layer():
    torch.manual_seed(0)
    head = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, num_layers=3)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    assert torch.equal(g, torch.ones(10, 1)) and not g.requires_grad  # norm_last_layer: ||W_k|| = 1, frozen
    x = torch.randn(5, 8)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), bottleneck @ (v / v.norm(dim=1, keepdim=True)).T)
    assert head(x).abs().max() <= 1 + 1e-6  # unit vectors against unit prototypes: cosines
    assert DINOHead(8, 10, num_layers=1, batch_norm=True).mlp.__class__.__name__ == "Sequential"
    with_bn = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, batch_norm=True, norm_last_layer=False)
    assert [type(m).__name__ for m in with_bn.mlp] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]
    assert with_bn.last_layer.parametrizations.weight.original0.requires_grad


def test_frozen_last_layer_gets_a_zero_gradient_the_rest_trains():
    torch.manual_seed(0)
    head = DINOHead(8, 10, hidden_dim=6, bottleneck_dim=4, norm_last_layer=False)
    head.last_layer_frozen = True
    head(torch.randn(5, 8)).square().sum().backward()
    last = list(head.last_layer.parameters())
    assert all(p.grad is not None and not p.grad.any() for p in last)  # in the graph (DDP, ZeRO), zero
    assert all(p.grad.abs().sum() > 0 for p in head.mlp.parameters())
    head.zero_grad()
    head.last_layer_frozen = False
    head(torch.randn(5, 8)).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in last)


def test_weight_decay_cosine_through_the_trainer_schedule():
    assert cosine_weight_decay(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_weight_decay(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_weight_decay(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    cfg = load_config(DINO_RECIPE, ["train.warmup_steps=0"], check_paths=False)
    model = tiny("dino")
    optimizer = build_optimizer(cfg, model)
    schedule = build_scheduler(cfg, optimizer, total_steps=20)
    decays = {id(g): [] for g in optimizer.param_groups}
    for step in range(21):
        schedule.step_update(step)
        for g in optimizer.param_groups:
            decays[id(g)].append(g["weight_decay"])
    curves = sorted(decays.values(), key=max)
    assert curves[0] == [0.0] * 21  # biases and norms: never decayed
    assert curves[1] == pytest.approx([cosine_weight_decay(k, 20, 0.04, 0.4) for k in range(21)])
    constant = build_scheduler(load_config(DINO_RECIPE, ["train.weight_decay_end=null"], check_paths=False),
                               optimizer, 20)
    assert constant.weight_decay is None


# ----------------------------------------------------------------------------- DINO


def test_dino_forward_is_the_papers_loss_with_one_backbone_call_per_resolution():
    model = tiny("dino", center_momentum=0.8)
    views = multi_crop_views(local_sizes=(8, 8, 12))
    with torch.no_grad():
        model.center.center.normal_()  # a non-trivial centre
    old_center = model.center.center.clone()
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    loss = model(views)["loss"]
    assert calls == [8, 8, 4]  # globals, the two 8 px locals, the 12 px local

    student = [model.head(model.backbone(v)) for v in views]
    teacher = model.teacher.module
    with torch.no_grad():
        t = [teacher.head(teacher.backbone(v)) for v in views[:2]]
    probs = [F.softmax((x - old_center) / 0.04, dim=-1) for x in t]
    torch.testing.assert_close(loss, dino_loss(student, probs, 0.1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.center.center, 0.8 * old_center + 0.2 * torch.cat(t).mean(dim=0, keepdim=True))


def test_dino_teacher_is_an_ema_without_stochastic_depth_and_is_exported():
    model = tiny("dino", backbone=vit(drop_path_rate=0.2), momentum=0.9)
    assert model.exported_backbone == "teacher.module.backbone"
    assert model.get_submodule("teacher.module.backbone") is model.teacher.module.backbone
    assert {m.drop_prob for m in model.teacher.modules() if hasattr(m, "drop_prob")} == {0.0}
    assert max(m.drop_prob for m in model.backbone.modules() if hasattr(m, "drop_prob")) > 0
    model(multi_crop_views())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    cfg = Config()
    cfg.train.optimizer = "adamw"
    optimizer = build_optimizer(cfg, model)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.teacher.parameters()}
    old = [p.clone() for p in model.teacher.parameters()]
    optimizer.step()
    model.on_step_end(1, 10)
    student = list(model.student().parameters())
    for before, after, theta in zip(old, model.teacher.parameters(), student):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * theta)
    assert int(model.steps_done) == 1
    restored = tiny("dino", backbone=vit(drop_path_rate=0.2), momentum=0.9)
    restored.load_state_dict(model.state_dict())  # teacher, centre and the steps' clock are checkpointed
    assert int(restored.steps_done) == 1 and torch.equal(restored.center.center, model.center.center)


def test_dino_schedules_run_on_the_steps_done():
    model = tiny("dino", teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=3,
                 freeze_last_layer_steps=2, momentum=0.9)
    seen, frozen = [], []
    update = model.teacher.update
    model.teacher.update = lambda online, m: (seen.append(m), update(online, m))
    for step in range(4):
        assert model.start_step() == pytest.approx(teacher_temperature(step, 3, 0.04, 0.07))
        model(multi_crop_views(batch=2))
        frozen.append(model.head.last_layer_frozen)
        model.on_step_end(step + 1, 4)
    assert frozen == [True, True, False, False]
    assert seen == pytest.approx([cosine_momentum(k, 4, 0.9) for k in range(4)])


def test_dino_trains_a_cnn_with_batchnorm_heads():
    torch.manual_seed(0)
    model = create_method("dino", create_backbone("resnet10t"), head_batch_norm=True, **HEADS).train()
    out = model([torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)])
    out["loss"].backward()
    assert math.isfinite(out["loss"].item())
    assert model.backbone.conv1[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- iBOT masking


def test_block_masking_masks_rectangles_up_to_the_budget():
    masking = BlockMasking((14, 14), min_patches=16)
    rng = random.Random(0)
    for target in (0, 20, 50, 98):
        mask = masking(target, rng)
        assert mask.shape == (14, 14) and mask.dtype == torch.bool
        assert mask.sum() <= target  # never over the budget
        if target:
            assert mask.sum() >= 0.5 * target  # blocks keep coming until the budget is (nearly) spent
    # each block is one rectangle of area within [min_patches, budget] (up to rounding) and aspect within
    # [0.3, 1 / 0.3] (rounding h and w to integers stretches it: a 5 x 1 block of area 7 at aspect 3.3)
    masking, areas = BlockMasking((8, 8), min_patches=4), []
    for seed in range(30):
        mask = torch.zeros(8, 8, dtype=torch.bool)
        added = masking._add_block(mask, 16, random.Random(seed))
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert added == mask.sum() == h * w and mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert 2 <= added <= 16 and 1 / 6 <= h / w <= 6
        areas.append(added)
    assert len(set(areas)) > 3  # areas drawn, not fixed


def test_sample_masks_masks_a_share_of_the_views_with_stratified_ratios():
    masking = BlockMasking((10, 10), min_patches=1)
    masks = sample_masks(8, masking, probability=0.5, ratio=(0.1, 0.5), rng=random.Random(1))
    assert masks.shape == (8, 100) and masks.dtype == torch.bool
    counts = sorted(masks.sum(dim=1).tolist())
    assert counts[:4] == [0, 0, 0, 0]  # int(8 * 0.5) views masked, the others not at all
    bounds = np.linspace(10, 50, 5)  # masked view i draws its ratio in the i-th quarter of [0.1, 0.5]
    for count, upper in zip(counts[4:], bounds[1:]):
        assert 1 <= count <= upper
    assert not torch.equal(masks, sample_masks(8, masking, 0.5, (0.1, 0.5), random.Random(2)))


# ----------------------------------------------------------------------------- iBOT


def test_ibot_loss_is_the_sum_of_its_terms_and_everything_trains():
    model = tiny("ibot", koleo_weight=0.1, patch_loss_weight=0.5, mask_min_patches=1)
    torch.manual_seed(4)
    out = model(multi_crop_views())
    assert out["patch_loss"] > 0
    torch.testing.assert_close(out["loss"], out["cls_loss"] + 0.5 * out["patch_loss"] + 0.1 * out["koleo_loss"])
    out["loss"].backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "mask_token" in trainable and all(model.get_parameter(n).grad is not None for n in trainable)
    assert model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_ibot_student_sees_masked_globals_and_the_teacher_unmasked_ones():
    model = tiny("ibot", mask_probability=1.0, mask_ratio=(0.4, 0.5), mask_min_patches=1)
    views = multi_crop_views(batch=2, local_sizes=())
    seen = {}
    model.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("student", i[0].detach()))
    model.teacher.module.backbone.blocks[0].register_forward_hook(lambda m, i, o: seen.setdefault("teacher", i[0]))
    torch.manual_seed(7)
    model(views)
    torch.manual_seed(7)
    masks = model.sample_masks(torch.cat(views))
    assert masks.any(dim=1).all()  # probability 1: every global view masked
    prefix = model.backbone.num_prefix_tokens
    differs = (seen["student"][:, prefix:] - seen["teacher"][:, prefix:]).abs().sum(dim=-1) > 1e-6
    assert torch.equal(differs, masks)  # exactly the masked patches got the mask token (student == teacher at init)


def test_ibot_with_registers_separate_heads_and_sinkhorn():
    model = tiny("ibot", backbone=vit(reg_tokens=2), separate_head=True, patch_out_dim=16, centering="sinkhorn_knopp",
                 mask_min_patches=1)
    assert model.backbone.num_prefix_tokens == 3 and set(model.teacher.module.keys()) == {"backbone", "head", "patch_head"}
    assert model.patch_head.last_layer.weight.shape == (16, 16)
    out = model(multi_crop_views())
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and torch.equal(model.center.center, torch.zeros(1, 32))  # SK: no centre


@pytest.mark.parametrize("backbone,args,message", [
    ("resnet10t", {}, "must be a timm VisionTransformer"),
    ("vit", {"global_pool": "avg"}, "token pooling"),
    ("vit", {"centering": "none"}, "centering must be one of"),
    ("vit", {"patch_out_dim": 16}, "patch_out_dim=16 needs separate_head=true"),
    ("vit", {"mask_ratio": (0.5, 0.2)}, "mask_ratio"),
])
def test_ibot_refuses_what_it_cannot_train(backbone, args, message):
    pool = {"global_pool": args.pop("global_pool")} if "global_pool" in args else {}
    net = create_backbone("resnet10t") if backbone == "resnet10t" else vit(**pool)
    with pytest.raises(ValueError, match=message):
        tiny("ibot", backbone=net, **args)
