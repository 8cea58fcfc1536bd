"""Projection / prediction MLPs shared by the methods."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


class MLPHead(nn.Sequential):
    """``num_layers`` linear layers; every hidden layer is Linear -> BN -> ReLU.

    SimCLR (Chen et al. 2020) uses 2 layers (``in -> hidden -> out``) with BN in the hidden
    layer; BYOL/MoCo v3 heads differ only in depth, widths and ``last_batch_norm`` (a BN after
    the output layer, without affine parameters unless ``last_affine``, as NNCLR's).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                 batch_norm: bool = True, last_batch_norm: bool = False, last_affine: bool = False):
        if num_layers < 1:
            raise ValueError(f"MLPHead needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
        if last_batch_norm:
            layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
        super().__init__(*layers)


class UpsamplingDecoder(nn.Sequential):
    """A feature map (N, in_dim, h, w) -> (N, out_dim, h * 2^num_upsamples, w * 2^num_upsamples):
    ``num_upsamples`` stride-2 up-convolutions (kernel 4, BN, ReLU), halving the channels down to
    ``min_dim``, then a 3x3 convolution to ``out_dim``: the decoder of the context encoder
    (Pathak et al. 2016, "up-convolutional" layers) and of the colorization network."""

    def __init__(self, in_dim: int, out_dim: int, num_upsamples: int, min_dim: int = 32):
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_upsamples):
            next_dim = max(min_dim, dim // 2)
            layers += [nn.ConvTranspose2d(dim, next_dim, kernel_size=4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(next_dim), nn.ReLU(inplace=True)]
            dim = next_dim
        layers.append(nn.Conv2d(dim, out_dim, kernel_size=3, padding=1))
        super().__init__(*layers)


class _ZeroGradient(torch.autograd.Function):
    """The identity, with a zero gradient: what is behind it stays in the graph (so DDP and ZeRO
    see a gradient for every parameter, as they require) but receives no update signal."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(grad)


class DINOHead(nn.Module):
    """The projection head of DINO (Caron et al. 2021, sec. 3.1 and appendix), also iBOT's and
    DINOv2's: an MLP of ``num_layers`` linear layers (hidden width ``hidden_dim``, GELU, optional
    BatchNorm) down to a ``bottleneck_dim`` bottleneck, L2 normalisation, then a weight-normalised
    linear layer without bias to ``out_dim`` prototypes (Salimans & Kingma 2016):

        g(x) = W_n (h(x) / ||h(x)||),   W_n[k] = g_k v_k / ||v_k||

    The MLP's linears start from a truncated normal (std 0.02, zero bias), ``g`` from 1.
    ``norm_last_layer`` keeps ``g`` frozen at 1 (every prototype a unit vector; DINO's default,
    the stabler choice for large ViTs). ``last_layer_frozen`` (set by the method, e.g. for DINO's
    first epoch) zeroes the gradient of the last layer, which DINO found to stabilise training; by
    weight normalisation its function is unchanged even if weight decay shrinks ``v`` meanwhile.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"DINOHead needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims, dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(b)] if batch_norm else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g, (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)
        self.last_layer_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        weight = self.last_layer.weight  # g v / ||v||, recomputed from the parameters
        return F.linear(x, _ZeroGradient.apply(weight) if self.last_layer_frozen else weight)
