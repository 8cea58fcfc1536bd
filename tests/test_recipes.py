"""Every recipe in configs/ loads, names a registered method with arguments it accepts, builds the
views that method takes at the size its backbone expects; the Fashion-MNIST ones also build
their model and take a training step (with labels for the methods that take them)."""
from pathlib import Path

import pytest
import torch

from ssl_foundry.models.backbones import create_backbone
from ssl_foundry.models.registry import check_method_args, create_method, method_class, takes_teacher
from ssl_foundry.pipeline.config import load_config
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform
from ssl_foundry.pipeline.data.augment.spec import view_sizes

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
METHODS = ("simclr", "moco_v2", "moco_v3", "mae", "byol", "barlow_twins", "swav", "vicreg", "simsiam", "nnclr",
           "distill", "dino", "ibot")


def test_every_method_has_a_cpu_and_a_paper_scale_recipe():
    names = {p.stem for p in CONFIGS}
    for method in METHODS:
        assert any(n.startswith(method + "_") and n.endswith("_fmnist") for n in names), method
        assert any(n.startswith(method + "_") and n.endswith("_imagenet") for n in names), method


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_loads_and_matches_its_method(path):
    cfg = load_config(path, check_paths=False)
    method, m = cfg.model.method, cfg.model
    assert path.stem.startswith(method + "_"), f"{path.name}: file name should start with the method ({method})"
    check_method_args(method, m.method_args)
    num_views, multi_crop = method_class(method).num_views, getattr(method_class(method), "multi_crop", False)
    made = sum(v.count for v in cfg.data.views)
    assert made >= num_views if multi_crop else made == num_views

    views = MultiViewTransform(cfg.data.views, cfg.data.mean, cfg.data.std)(
        torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
    sizes = {tuple(v.shape) for v in views[:num_views]}  # multi-crop: the global views; local ones are smaller
    assert len(sizes) == 1
    (shape,) = sizes
    assert all(v.shape[-1] < shape[-1] for v in views[num_views:])
    if "vit" in m.backbone:  # a ViT takes exactly its img_size
        assert shape[-1] == m.backbone_args.get("img_size", 224)
    if path.stem.endswith("_fmnist"):
        assert shape == (3, 32, 32)
        # a ViT is evaluated at its img_size; a CNN may see larger test images than its crops (FixRes)
        assert cfg.data.eval_image_size == 32 if "vit" in m.backbone else cfg.data.eval_image_size >= 32
        assert cfg.data.train == "data/fashion-mnist/train" and cfg.data.eval_test == "data/fashion-mnist/test"
    local_batch = cfg.train.batch_size // cfg.train.grad_accum_steps
    if method == "moco_v2":
        assert m.method_args["queue_size"] % local_batch == 0, "queue_size must be a multiple of the global batch"
    assert cfg.train.batch_size % (cfg.launch.nproc_per_node * cfg.launch.nnodes * cfg.train.grad_accum_steps) == 0


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.endswith("_fmnist")],
                         ids=[p.stem for p in CONFIGS if p.stem.endswith("_fmnist")])
def test_cpu_recipe_model_takes_a_training_step(path):
    cfg = load_config(path, check_paths=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        backbone = create_backbone(cfg.model.backbone, **cfg.model.backbone_args)
        teacher = create_backbone("resnet10t") if takes_teacher(cfg.model.method) else None  # any timm backbone
        model = create_method(cfg.model.method, backbone, teacher=teacher, **cfg.model.method_args).train()
        if cfg.model.method == "moco_v2":
            model.queue = type(model.queue)(4 * 4, cfg.model.method_args["proj_out_dim"])  # a batch of 4 here
        views = [torch.randn(4, 3, *size) for size in view_sizes(cfg.data.views)]  # multi-crop: globals and locals
        labels = torch.tensor([3, -1, 0, 9])  # S4L / SLA: a batch with one unlabelled image
        loss = (model(views, labels) if getattr(model, "uses_labels", False) else model(views))["loss"]
        loss.backward()
        if hasattr(model, "on_step_end"):
            model.on_step_end(1, cfg.train.max_steps)
        assert torch.isfinite(loss)
        assert model.backbone.num_features > 0
    finally:
        torch.set_num_threads(threads)


def test_config_validation_names_bad_method_args_and_view_counts():
    from ssl_foundry.pipeline.config import ConfigError

    path = next(p for p in CONFIGS if p.stem == "byol_resnet18_fmnist")
    with pytest.raises(ConfigError, match="model.method_args.temprature.*Valid keys.*momentum"):
        load_config(path, ["model.method_args.temprature=0.1"], check_paths=False)
    with pytest.raises(ConfigError, match="takes 1 view"):
        load_config(path, ["model.method=mae", "model.method_args={}"], check_paths=False)
