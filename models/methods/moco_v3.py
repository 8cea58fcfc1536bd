"""MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021. https://arxiv.org/abs/2104.02057"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ssl_foundry.models.backbones import freeze_sincos_pos_embed, is_vit
from ssl_foundry.models.heads import MLPHead
from ssl_foundry.models.losses import moco_v3_contrastive_loss
from ssl_foundry.models.momentum import MomentumEncoder, cosine_momentum
from ssl_foundry.models.registry import register_method


@torch.no_grad()
def moco_v3_vit_init(vit: nn.Module) -> None:
    """The official MoCo v3 ViT initialisation (``VisionTransformerMoCo.__init__``), in place."""
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in name:  # q, k, v as three (D, D) matrices: xavier bound for fan_in + fan_out = D + D
                bound = math.sqrt(6.0 / (module.weight.shape[0] // 3 + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    if vit.cls_token is not None:
        nn.init.normal_(vit.cls_token, std=1e-6)
    proj = vit.patch_embed.proj  # xavier for the linear map of a flattened 3 x p x p patch to D
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    nn.init.zeros_(proj.bias)


@register_method("moco_v3")
class MoCoV3(nn.Module):
    """Algorithm 1 of the paper: no queue; keys of the global batch are the negatives.

        q1, q2 = f_q(x1), f_q(x2)            f_q = predictor(projector(backbone))
        k1, k2 = f_k(x1), f_k(x2)            f_k = momentum copy of projector(backbone), no grad
        loss = ctr(q1, k2) + ctr(q2, k1)     ctr: InfoNCE against gather(k), times 2t
        after each step: f_k <- m f_k + (1 - m) f_q, m cosine from ``momentum`` to 1

    Heads are the official ones (``moco/builder.py``): projector of ``proj_layers`` layers (3 for
    ViT, 2 for ResNet; ``None`` picks by backbone) with BN on every layer including the last (no
    affine there), predictor of 2 layers, also ending in BN without affine for a ViT (not for a
    ResNet); hidden width 4096, output 256. Each view goes through the encoders in its own call,
    as in the reference code.

    A ViT backbone is initialised as the official ``vits.py`` does (:func:`moco_v3_vit_init`):
    xavier-uniform linear layers (q, k and v each as its own matrix), zero biases, the class
    token from N(0, 1e-6), and the patch projection xavier-uniform as a 3p^2 -> D linear map,
    which matters because ``freeze_patch_embed`` keeps it at that random value. ViT options
    (sec. 4 / 4.2 of the paper): ``fixed_pos_embed`` replaces the learned position embedding with
    a frozen 2-D sin-cos one; ``freeze_patch_embed`` keeps the random patch projection frozen,
    the paper's trick for training stability. Frozen parameters stay in the exported timm ViT.
    """

    num_views = 2

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_out_dim: int = 256,
                 proj_layers: int | None = None, pred_hidden_dim: int = 4096, temperature: float = 1.0,
                 momentum: float = 0.99, fixed_pos_embed: bool = False, freeze_patch_embed: bool = False):
        super().__init__()
        vit = is_vit(backbone)
        if (fixed_pos_embed or freeze_patch_embed) and not vit:
            raise ValueError("moco_v3: fixed_pos_embed and freeze_patch_embed apply to ViT backbones only, "
                             f"not {type(backbone).__name__}")
        if vit:
            moco_v3_vit_init(backbone)
        if fixed_pos_embed:
            freeze_sincos_pos_embed(backbone)
        if freeze_patch_embed:
            backbone.patch_embed.proj.requires_grad_(False)
        self.backbone = backbone
        layers = proj_layers if proj_layers is not None else (3 if vit else 2)
        self.projector = MLPHead(backbone.num_features, proj_hidden_dim, proj_out_dim, layers,
                                 last_batch_norm=True)
        self.predictor = MLPHead(proj_out_dim, pred_hidden_dim, proj_out_dim, num_layers=2, last_batch_norm=vit)
        self.momentum_encoder = MomentumEncoder(self._base_encoder())
        self.temperature = temperature
        self.base_momentum = momentum

    def _base_encoder(self) -> nn.Module:
        return nn.Sequential(self.backbone, self.projector)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) != 2:
            raise ValueError(f"MoCo v3 takes 2 views, got {len(views)}: check data.views in the recipe")
        x1, x2 = views
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss = (moco_v3_contrastive_loss(q1, k2, self.temperature)
                + moco_v3_contrastive_loss(q2, k1, self.temperature))
        return {"loss": loss}

    def on_step_end(self, step: int, total_steps: int) -> None:
        """``step`` optimizer steps are done; the update after step k (0-based) uses m(k)."""
        m = cosine_momentum(step - 1, total_steps, self.base_momentum)
        self.momentum_encoder.update(self._base_encoder(), m)
