"""Projection / prediction MLPs shared by the methods."""
from __future__ import annotations

import torch.nn as nn


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
