"""Do two augmentation backends give the same distribution of views? The statistic behind the DALI
parity tests (tests/test_dali.py) and the DALI item of `foundry check gpu`.

The backends never draw the same random views, so views are compared through a statistic (a
channel's mean or standard deviation per view) paired by source image: per image, the backends'
mean statistic differs by d; the mean of d over images must be within 4 standard errors of 0,
plus an allowance for differences by design. Pairing takes the (large) image-to-image variance out.
"""
from __future__ import annotations

import torch

# Grey levels (0..255): DALI rounds to uint8 where torchvision truncates, a bias of up to 0.5 per op
# over a chain of ~4 ops (pipeline.data.augment.dali_backend).
ROUNDING_ALLOWANCE = 2.0


def to_pixels(view: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Normalised (B, 3, h, w) views -> 0..255 floats."""
    scale = torch.tensor(std, device=view.device)[:, None, None]
    return 255 * (view * scale + torch.tensor(mean, device=view.device)[:, None, None])


def _means_by_key(keys: list[str], values: torch.Tensor) -> dict[str, float]:
    names = sorted(set(keys))
    position = {name: i for i, name in enumerate(names)}
    index = torch.tensor([position[k] for k in keys])
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, values.detach().double().cpu())
    means = sums / torch.bincount(index, minlength=len(names))
    return dict(zip(names, means.tolist()))


def paired_comparison(a_keys: list[str], a_values: torch.Tensor, b_keys: list[str], b_values: torch.Tensor,
                      allowance: float) -> dict:
    """``a_values`` / ``b_values`` hold one statistic per view, ``a_keys`` / ``b_keys`` the source image
    of each; images seen by one backend only are left out. Returns the mean paired difference (a - b),
    its bound (4 standard errors + ``allowance``), the number of images paired and whether it agrees."""
    a, b = _means_by_key(a_keys, a_values), _means_by_key(b_keys, b_values)
    shared = sorted(a.keys() & b.keys())
    if len(shared) < 2:
        raise ValueError(f"a paired comparison needs 2 or more images seen by both backends, got {len(shared)}")
    diff = torch.tensor([a[k] - b[k] for k in shared], dtype=torch.float64)
    mean, bound = float(diff.mean()), float(4 * diff.std() / len(diff) ** 0.5) + allowance
    return {"difference": mean, "bound": bound, "images": len(shared), "agree": abs(mean) <= bound}


def paired_within(a_keys: list[str], a_values: torch.Tensor, b_keys: list[str], b_values: torch.Tensor,
                  allowance: float) -> bool:
    return paired_comparison(a_keys, a_values, b_keys, b_values, allowance)["agree"]
