"""Backbones come from timm only, so every exported backbone is rebuildable by plain timm
from ``(architecture, model_args)``."""
from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer


def create_backbone(name: str, **model_args: Any) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``forward`` returns pooled features
    of size ``model.num_features``. Its convolutions compute a 1x1 output as a matmul
    (:class:`SingleOutputConv2d`); parameters and state dict are timm's."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise KeyError(f"model.backbone: '{name}' is not a timm model. Similar: {', '.join(close)}")
    return single_output_convs(timm.create_model(name, pretrained=False, num_classes=0, **model_args))


def single_output_convs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """``model`` with every ``nn.Conv2d`` a :class:`SingleOutputConv2d` (or, ``enabled=False``, back
    to ``nn.Conv2d``): the same parameters, buffers and hooks, only ``forward`` changes."""
    old, new = (nn.Conv2d, SingleOutputConv2d) if enabled else (SingleOutputConv2d, nn.Conv2d)
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
    return model


def single_output_window(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int] | None:
    """When ``conv`` maps an input of spatial ``size`` to a 1x1 output: the (h, w) corner of the
    input its one output position reads (the rest of its receptive field is zero padding); else None."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.dilation != (1, 1):
        return None
    if any((n + 2 * p - k) // s + 1 != 1 for n, p, k, s in zip(size, conv.padding, conv.kernel_size, conv.stride)):
        return None
    # The output reads input rows -p .. k-1-p, of which 0 .. min(n, k-p)-1 exist (kernel rows p ..).
    return tuple(min(n, k - p) for n, p, k in zip(size, conv.padding, conv.kernel_size))


class SingleOutputConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes a 1x1 output as the matmul it is: the input corner it reads
    times the kernel taps that fall on it, W[:, :, p:p+h, p:p+w]. The same function, gradients
    included (the other taps multiply zero padding, so their gradient is zero either way).

    Why: a ResNet on small images ends in such convolutions (layer4 of a ResNet-18 sees 2x2 and
    1x1 maps from 32 and 16 px views), and oneDNN's CPU kernels handle them badly: layer4's
    backward ran at 40-100 GFLOP/s against 300-600 for the forward, ~40 % of the Fashion-MNIST
    demo's step, and its bf16 weight gradient for a 1x1 input comes back with garbage values.
    Any other input goes to ``nn.Conv2d.forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = single_output_window(tuple(x.shape[-2:]), self)
        if window is None:
            return super().forward(x)
        (h, w), (p_h, p_w) = window, self.padding
        taps = self.weight[:, :, p_h:p_h + h, p_w:p_w + w]
        return F.linear(x[:, :, :h, :w].flatten(1), taps.flatten(1), self.bias)[:, :, None, None]


def is_vit(backbone: nn.Module) -> bool:
    return isinstance(backbone, VisionTransformer)


def sincos_pos_embed(grid_size: tuple[int, int], dim: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (timm's ``build_sincos2d_pos_embed``), shape
    ``(1, num_prefix_tokens + H * W, dim)``; prefix tokens (class, registers) get zeros, as in
    MAE and MoCo v3."""
    patches = build_sincos2d_pos_embed(list(grid_size), dim=dim)
    return torch.cat([torch.zeros(num_prefix_tokens, dim), patches]).unsqueeze(0)


def freeze_sincos_pos_embed(vit: VisionTransformer) -> None:
    """Replace a timm ViT's learned position embedding by the fixed 2-D sin-cos one, frozen
    (``requires_grad=False``). The model stays a plain timm ViT: the values live in its
    ``pos_embed`` parameter and are exported with it."""
    if vit.pos_embed is None:
        raise ValueError("this ViT has no absolute position embedding (pos_embed='none')")
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    fixed = sincos_pos_embed(vit.patch_embed.grid_size, vit.embed_dim, prefix)
    with torch.no_grad():
        vit.pos_embed.copy_(fixed.to(vit.pos_embed))
    vit.pos_embed.requires_grad_(False)


def vit_tokens(vit: VisionTransformer, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Every output token of a timm ViT, ``(N, num_prefix_tokens + L, D)`` after its final norm
    (class and register tokens first), as ``forward_features``; with ``mask`` ((N, L) bool, True =
    masked) the embeddings of the masked patches are replaced by ``mask_token`` (D,) before the
    position embedding is added, as BEiT, iBOT and DINOv2 mask their student's input."""
    x = vit.patch_embed(x)  # (N, L, D), or (N, h, w, D) with dynamic_img_size
    if mask is not None:
        x = torch.where(mask.view(*x.shape[:-1], 1), mask_token.to(x.dtype), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    # train.activation_checkpointing: recompute the blocks in backward, as timm's forward_features does
    x = checkpoint_seq(vit.blocks, x) if vit.grad_checkpointing and torch.is_grad_enabled() else vit.blocks(x)
    return vit.norm(x)


def feature_map_reduction(backbone: nn.Module, method: str) -> int:
    """How many input pixels one position of a CNN's final feature map (``forward_features``,
    (N, C, h, w)) spans per side, e.g. 32 for a ResNet; for methods that decode that map."""
    if is_vit(backbone) or not getattr(backbone, "feature_info", None):
        raise ValueError(f"{method}: needs a CNN backbone whose forward_features is a (N, C, h, w) map "
                         f"(e.g. resnet18), got {type(backbone).__name__}; set model.backbone")
    return int(backbone.feature_info[-1]["reduction"])


def sincos_1d_pos_embed(length: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sin-cos position embedding of positions 0..length-1, shape ``(length, dim)``: the
    first half sin(pos * w_i), the second cos(pos * w_i), w_i = 10000^(-i / (dim / 2)) (MAE's
    ``get_1d_sincos_pos_embed_from_grid``); ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"a sin-cos position embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()
