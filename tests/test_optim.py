"""The optimizer's parameter groups as each recipe's paper sets them: plain or Nesterov momentum
SGD, weight decay on biases and norm parameters or not, Barlow Twins' lr for biases and BN
parameters, SimSiam's fixed-lr predictor, and timm's grouping kept for everything else."""
import math

import pytest
import torch
from timm.optim import create_optimizer_v2

from ssl_foundry.pipeline.config import ConfigError, load_config
from ssl_foundry.pipeline.train.optim import base_lr, build_optimizer
from ssl_foundry.pipeline.train.trainer import build_model, build_scheduler, scheduled_lr

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_RESNET = ["model.backbone=resnet10t", "model.method_args.proj_hidden_dim=32", "model.method_args.proj_out_dim=16"]


def recipe(name: str, *overrides: str):
    cfg = load_config(f"configs/{name}.yaml", list(overrides), check_paths=False)
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    return cfg, model, optimizer


def named_groups(model, optimizer) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]


def test_barlow_twins_imagenet_groups_carry_the_official_bias_lr_and_gradient_scale():
    cfg, model, optimizer = recipe("barlow_twins_resnet50_imagenet", *TINY_RESNET)
    assert type(optimizer).__name__ == "Lars" and model.loss_scale == pytest.approx(1 / 32)
    biases, weights = optimizer.param_groups
    assert all(model.get_parameter(n).ndim == 1 for n in named_groups(model, optimizer)[0])
    assert biases["weight_decay"] == 0.0 and biases["lr_scale"] == pytest.approx(0.0048 / 0.2)
    assert weights["weight_decay"] == 1.5e-6 and "lr_scale" not in weights
    scheduler = build_scheduler(cfg, optimizer, cfg.train.max_steps)
    for step in (0, 3000, 6250, 300000, cfg.train.max_steps - 1):
        scheduler.step_update(step)
        assert biases["lr"] == pytest.approx(0.024 * weights["lr"], rel=1e-12)
        assert scheduled_lr(optimizer) == weights["lr"]
    scheduler.step_update(6250)  # the peak: 0.2 x 2048 / 256 = 1.6 for weights, 0.0048 x 8 for biases
    assert weights["lr"] == pytest.approx(1.6, rel=1e-3) and biases["lr"] == pytest.approx(0.0384, rel=1e-3)


def test_default_groups_are_timms():
    """No recipe key set: the groups (and the order of their parameters) are timm's filter_bias_and_bn
    ones, so checkpoints of earlier runs load."""
    cfg, model, optimizer = recipe("simclr_resnet18_fmnist", *TINY_RESNET)
    timm_optimizer = create_optimizer_v2(model, opt="lars", lr=base_lr(cfg), weight_decay=cfg.train.weight_decay)
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == \
        [[id(p) for p in g["params"]] for g in timm_optimizer.param_groups]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, cfg.train.weight_decay]


@pytest.mark.parametrize("name,nesterov", [("rotnet_resnet18_fmnist", True), ("moco_v2_resnet18_fmnist", False),
                                           ("simsiam_resnet18_fmnist", False)])
def test_sgd_momentum_is_the_papers(name, nesterov):
    _, _, optimizer = recipe(name, "model.backbone=resnet10t")
    assert type(optimizer) is torch.optim.SGD
    assert all(g["nesterov"] is nesterov and g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_nesterov_is_refused_where_it_means_nothing():
    with pytest.raises(ConfigError, match="train.nesterov=true.*sgd"):
        load_config("configs/byol_resnet18_fmnist.yaml", ["train.nesterov=true"], check_paths=False)
    with pytest.raises(ConfigError, match="bias_and_norm_lr_scale must be > 0"):
        load_config("configs/byol_resnet18_fmnist.yaml", ["train.bias_and_norm_lr_scale=0"], check_paths=False)


def test_moco_v3_vit_adamw_decays_every_parameter():
    cfg, model, optimizer = recipe("moco_v3_vit_base_imagenet", "model.backbone=vit_tiny_patch16_224",
                                   "model.backbone_args={img_size: 32, depth: 1}",
                                   "model.method_args={proj_hidden_dim: 32, proj_out_dim: 16, pred_hidden_dim: 32}")
    assert all(g["weight_decay"] == 0.1 for g in optimizer.param_groups)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in model.parameters() if p.requires_grad}  # the frozen patch projection is not trained


def test_simsiam_predictor_keeps_the_base_lr_while_the_rest_follows_the_schedule():
    cfg, model, optimizer = recipe("simsiam_resnet18_fmnist", *TINY_RESNET, "model.method_args.pred_hidden_dim=8",
                                   "train.warmup_steps=10")
    groups = named_groups(model, optimizer)
    fixed = [g for g, names in zip(optimizer.param_groups, groups) if all(n.startswith("predictor.") for n in names)]
    assert len(fixed) == 2 and all(g["fixed_lr"] for g in fixed)  # its biases/BN and its weights
    assert not any(n.startswith("predictor.") for g, names in zip(optimizer.param_groups, groups)
                   if not g.get("fixed_lr") for n in names)
    assert all(g["weight_decay"] == 5e-4 for g in optimizer.param_groups)  # decay_bias_and_norm: every parameter
    scheduler = build_scheduler(cfg, optimizer, 100)
    lr = base_lr(cfg)
    for step in (0, 5, 10, 55, 99):
        scheduler.step_update(step)
        assert all(g["lr"] == lr for g in fixed)
        expected = lr * 1e-3 + (lr - lr * 1e-3) * step / 10 if step < 10 else \
            0.5 * lr * (1 + math.cos(math.pi * (step - 10) / 90))
        assert scheduled_lr(optimizer) == pytest.approx(expected, rel=1e-9)
