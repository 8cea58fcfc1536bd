"""CIE Lab in plain torch ops, and the quantised ab space of Zhang, Isola, Efros, "Colorful Image
Colorization", ECCV 2016: bins, soft encoding and class rebalancing.

sRGB (D65, IEC 61966-2-1) <-> linear RGB <-> XYZ <-> Lab (CIE 1976, D65 reference white). Images
are (..., 3, H, W) with RGB in [0, 1]; Lab has L in [0, 100] and a, b roughly in [-110, 110].
"""
from __future__ import annotations

import torch

# linear sRGB -> XYZ, D65 (IEC 61966-2-1)
RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                           [0.2126729, 0.7151522, 0.0721750],
                           [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
XYZ_TO_RGB = torch.linalg.inv(RGB_TO_XYZ)
D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
DELTA = 6 / 29  # CIE's knee of f(t): cube root above delta^3, linear below


def _mix_channels(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,...jhw->...ihw", matrix.to(image), image)


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like)[:, None, None]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] -> Lab."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)
    xyz = _mix_channels(RGB_TO_XYZ, linear) / _per_channel(D65_WHITE, rgb)
    f = torch.where(xyz > DELTA ** 3, xyz.clamp(min=DELTA ** 3) ** (1 / 3), xyz / (3 * DELTA ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab -> sRGB, not clipped (out-of-gamut colours fall outside [0, 1])."""
    lightness, a, b = lab.unbind(dim=-3)
    fy = (lightness + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)
    xyz = torch.where(f > DELTA, f ** 3, 3 * DELTA ** 2 * (f - 4 / 29)) * _per_channel(D65_WHITE, lab)
    linear = _mix_channels(XYZ_TO_RGB, xyz)
    return torch.where(linear <= 0.0031308, 12.92 * linear,
                       1.055 * linear.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def ab_bin_centres(grid: float = 10.0, lightness_steps: int = 101, samples_per_side: int = 5) -> torch.Tensor:
    """(Q, 2) centres of the ab grid cells of side ``grid`` (centres at multiples of ``grid``) that
    hold an sRGB colour: some point of the cell (``samples_per_side``^2 sampled) is in gamut at
    some lightness (``lightness_steps`` values of L in [0, 100]). The classifier's output space:
    at grid 10 these are 262 cells spanning the same a in [-90, 100], b in [-110, 90] as Zhang et
    al.'s 313 bins, which are the convex hull of the colours seen in ImageNet."""
    axis = torch.arange(-110.0, 110.0 + grid / 2, grid, dtype=torch.float64)
    centres = torch.cartesian_prod(axis, axis)  # (G, 2)
    within = torch.linspace(-grid / 2, grid / 2, samples_per_side, dtype=torch.float64)
    points = centres[:, None] + torch.cartesian_prod(within, within)  # (G, S, 2)
    lightness = torch.linspace(0, 100, lightness_steps, dtype=torch.float64)
    lab = torch.cat([lightness[:, None, None, None].expand(-1, *points.shape[:2], 1),
                     points[None].expand(len(lightness), -1, -1, -1)], dim=-1)  # (L, G, S, 3)
    rgb = lab_to_rgb(lab.reshape(-1, 3).T[:, :, None])  # as a (3, L*G*S, 1) image
    in_gamut = ((rgb >= 0) & (rgb <= 1)).all(dim=0).reshape(lab.shape[:3])
    return centres[in_gamut.any(dim=0).any(dim=-1)].float()


def soft_encode_ab(ab: torch.Tensor, centres: torch.Tensor, neighbours: int = 5, sigma: float = 5.0
                   ) -> torch.Tensor:
    """Soft encoding of the ground truth (Zhang et al., H_gt^{-1}): each pixel's ab
    (N, 2, h, w) -> (N, Q, h, w), weights on its ``neighbours`` nearest bin centres proportional
    to a Gaussian of the distance (``sigma``), summing to 1."""
    n, _, h, w = ab.shape
    points = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    distances = torch.cdist(points, centres.to(points))  # (P, Q)
    nearest, index = distances.topk(neighbours, dim=1, largest=False)
    weights = torch.softmax(-nearest ** 2 / (2 * sigma ** 2), dim=1)
    encoded = torch.zeros_like(distances).scatter_(1, index, weights)
    return encoded.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def rebalancing_weights(bin_distribution: torch.Tensor, centres: torch.Tensor, mix: float = 0.5,
                        sigma: float = 5.0) -> torch.Tensor:
    """Class rebalancing (Zhang et al. eq. 3 and 4): the empirical ab distribution ``p`` (Q,),
    smoothed by a Gaussian of ``sigma`` over the bin centres (p~), mixed with the uniform
    distribution, inverted and normalised so that its expectation under p~ is 1:

        w ~ ((1 - mix) p~ + mix / Q)^-1,   sum_q p~_q w_q = 1
    """
    kernel = torch.exp(-torch.cdist(centres, centres) ** 2 / (2 * sigma ** 2))
    smoothed = kernel @ (bin_distribution / bin_distribution.sum())
    smoothed = smoothed / smoothed.sum()
    weights = 1 / ((1 - mix) * smoothed + mix / len(centres))
    return weights / (smoothed * weights).sum()
