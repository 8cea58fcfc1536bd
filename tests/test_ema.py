"""train.ema_decay: the backbone evaluated and exported is the exponential moving average of the
trained backbone over the steps, with timm's warmup: a copy after step 1, then
ema_t = d_t ema_(t-1) + (1 - d_t) w_t with d_t = min(ema_decay, 1 - t^(-3/4))."""
import pytest
import torch
from safetensors.torch import load_file

from ssl_foundry.pipeline.config import ConfigError
from ssl_foundry.pipeline.train import trainer as trainer_module
from ssl_foundry.pipeline.train.trainer import train


def test_exported_backbone_is_the_moving_average_of_the_trained_weights(tiny_config, tmp_path, monkeypatch):
    weights = []  # the trained backbone after each step
    real_init = trainer_module.Trainer.__init__

    def init_and_record(self, cfg):
        real_init(self, cfg)
        backbone = self.model.get_submodule(self.model.exported_backbone)
        self.step_callbacks.append(lambda step: weights.append(
            {k: v.detach().clone() for k, v in backbone.state_dict().items()}))

    monkeypatch.setattr(trainer_module.Trainer, "__init__", init_and_record)
    result = train(tiny_config(tmp_path / "run", "train.max_steps=4", "model.backbone=test_resnet",
                               "model.backbone_args={}", "train.ema_decay=0.5", "train.precision=fp32"))
    assert len(weights) == 4
    decays = [0.0, 1 - 2 ** -0.75, 0.5, 0.5]  # steps 1-4: copy, warmup 0.405, then the cap 0.5 (1 - 3^-3/4 = 0.56)
    expected = dict(weights[0])
    for decay, w in zip(decays[1:], weights[1:]):
        expected = {k: decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v for k, v in w.items()}
    exported = load_file(f"{result.backbone_dir}/model.safetensors")
    assert exported.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(exported[name].to(value.dtype), value, rtol=1e-5, atol=1e-6), name
    # Not the last weights: the average is what was exported.
    moved = [k for k, v in weights[-1].items() if v.is_floating_point() and not torch.allclose(exported[k], v)]
    assert moved


def test_ema_under_deepspeed_is_refused(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="train.ema_decay=0.99 .* train.strategy=ddp"):
        tiny_config(tmp_path / "run", "train.ema_decay=0.99", "train.strategy=deepspeed")
