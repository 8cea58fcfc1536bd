"""Targets of the classic pretext tasks, as plain functions of image batches: rotations (RotNet,
S4L, SLA), jittered grid tiles and the maximal-Hamming permutation set (Jigsaw, relative patch
location), colour countermeasures against chromatic aberration (relative patch location), and
inpainting masks (context encoder). Each method module builds its task from these, so the
targets are tested once, on hand-checked cases."""
from __future__ import annotations

import itertools

import torch

NUM_ROTATIONS = 4


def rotate_all(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four rotations of every image (Gidaris et al. 2018): (B, C, H, W) ->
    ((4B, C, H, W), labels (4B,)). Block ``r`` of B rows is every image rotated by ``r * 90``
    degrees counter-clockwise (``torch.rot90``), label ``r``; block 0 is the batch itself."""
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rotations need square images, got {tuple(images.shape[-2:])}: use square crops "
                         f"in data.views")
    rotated = torch.cat([torch.rot90(images, r, dims=(-2, -1)) for r in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def encode_rotations(backbone: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features of all four rotations of a batch (RotNet, S4L, SLA): ((4B, D)
    features, (4B,) rotation labels); rows [:B] are the upright images (``rotate_all``)."""
    rotated, rotation = rotate_all(images)
    return backbone(rotated), rotation


def hamming_permutation_set(size: int, num_tiles: int = 9, seed: int = 0) -> torch.Tensor:
    """The permutation set of Noroozi & Favaro 2016, Algorithm 1 ("maximal Hamming distance"):
    start from a random permutation of ``num_tiles`` tiles, then repeatedly add the permutation
    whose Hamming distances to the chosen ones have the largest sum (``argmax 1^T D``); returns
    (size, num_tiles) long, row ``k`` the tile order of class ``k``. Deterministic by ``seed``
    (the first pick and ties, which go to the lowest index as ``argmax`` does)."""
    all_perms = torch.tensor(list(itertools.permutations(range(num_tiles))), dtype=torch.uint8)
    if not 1 <= size <= all_perms.shape[0]:
        raise ValueError(f"permutation set size must be in [1, {num_tiles}!={all_perms.shape[0]}], got {size}")
    first = int(torch.randint(all_perms.shape[0], (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    distance_sum = torch.zeros(all_perms.shape[0], dtype=torch.long)  # 1^T D, updated one row at a time
    available = torch.ones(all_perms.shape[0], dtype=torch.bool)
    for _ in range(size - 1):
        available[chosen[-1]] = False
        distance_sum += (all_perms != all_perms[chosen[-1]]).sum(dim=1)
        chosen.append(int(torch.where(available, distance_sum, -1).argmax()))
    return all_perms[chosen].long()


MIN_TILE_SIZE = 4  # px: smaller tiles vanish inside a ResNet's stride-32 stem and stages


def grid_tile_size(image_size: int, grid: int, tile_ratio: float, method: str, ratio_key: str) -> int:
    """Side of the tiles of a ``grid`` x ``grid`` split: ``tile_ratio`` of a cell's side (the rest is
    the gap between tiles). Too small a tile is a ValueError naming the method's ratio key."""
    size = round(image_size // grid * tile_ratio)
    if size < MIN_TILE_SIZE:
        raise ValueError(f"{method}: {image_size} px views give {size} px tiles, too small for the backbone "
                         f"(at least {MIN_TILE_SIZE}); use larger crops in data.views or a larger "
                         f"model.method_args.{ratio_key}")
    return size


def grid_tile_offsets(batch: int, image_size: int, grid: int, tile_size: int, max_jitter: int | None,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Top-left corners (B, grid*grid, 2) (row, column), in row-major cell order, of tiles of side
    ``tile_size`` in a ``grid`` x ``grid`` split of the image into cells of side
    ``image_size // grid``: each tile sits centred in its cell, moved by a uniform random jitter of
    at most ``max_jitter`` pixels per axis, or (``None``) at a uniform random position anywhere in
    its cell. The unused border of every cell is the gap between tiles (Doersch et al. 2015;
    Noroozi & Favaro 2016)."""
    cell = image_size // grid
    margin = cell - tile_size
    if tile_size < 1 or margin < 0:
        raise ValueError(f"tile side {tile_size} does not fit cells of {cell} px ({image_size} px / {grid})")
    centre = margin // 2
    low, high = (0, margin) if max_jitter is None else (max(0, centre - max_jitter), min(margin, centre + max_jitter))
    inside = torch.randint(low, high + 1, (batch, grid * grid, 2), generator=generator)
    cells = torch.arange(grid * grid)
    origins = torch.stack([cells // grid, cells % grid], dim=1) * cell  # (K, 2)
    return (origins + inside).to(device)


def crop_tiles(images: torch.Tensor, offsets: torch.Tensor, tile_size: int) -> torch.Tensor:
    """(B, C, H, W) and top-left corners (B, K, 2) -> tiles (B, K, C, t, t), one gather."""
    b, k = offsets.shape[:2]
    steps = torch.arange(tile_size, device=images.device)
    rows = (offsets[..., 0, None] + steps)[:, :, :, None]  # (B, K, t, 1)
    cols = (offsets[..., 1, None] + steps)[:, :, None, :]  # (B, K, 1, t)
    batch_index = torch.arange(b, device=images.device)[:, None, None, None]
    tiles = images.permute(0, 2, 3, 1)[batch_index, rows, cols]  # (B, K, t, t, C)
    return tiles.permute(0, 1, 4, 2, 3)


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each tile to zero mean and unit standard deviation on its own (Noroozi & Favaro 2016:
    so that tiles cannot be matched by their low-level statistics). Tiles are the
    leading dims of (..., C, t, t)."""
    mean = tiles.mean(dim=(-3, -2, -1), keepdim=True)
    std = tiles.std(dim=(-3, -2, -1), keepdim=True)
    return (tiles - mean) / (std + eps)


def drop_colour(patches: torch.Tensor, noise_std: float = 0.01, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Colour dropping (Doersch et al. 2015, against chromatic aberration): of every
    (C=3, h, w) patch keep one random channel and replace the other two by Gaussian noise of
    ``noise_std`` times the kept channel's standard deviation (the paper: 1/100)."""
    n = patches.shape[0]
    keep = torch.randint(patches.shape[1], (n,), generator=generator).to(patches.device)
    kept = patches[torch.arange(n, device=patches.device), keep][:, None]  # (N, 1, h, w)
    scale = noise_std * kept.std(dim=(-2, -1), keepdim=True)
    noise = torch.randn(patches.shape, generator=generator).to(patches) * scale
    keep_mask = torch.nn.functional.one_hot(keep, patches.shape[1]).to(patches)[:, :, None, None]
    return keep_mask * patches + (1 - keep_mask) * noise


GREEN_MAGENTA = torch.tensor([-1.0, 2.0, -1.0]) / 6 ** 0.5


def project_colour(patches: torch.Tensor) -> torch.Tensor:
    """Projection (Doersch et al. 2015, against chromatic aberration): remove every
    pixel's component along the green-magenta axis ``a = (-1, 2, -1) / sqrt(6)`` of RGB,
    ``x - (x . a) a``, the colour direction in which lenses shift most."""
    axis = GREEN_MAGENTA.to(patches)[:, None, None]
    return patches - (patches * axis).sum(dim=-3, keepdim=True) * axis


def central_mask(batch: int, image_size: int, fraction: float = 0.5, device=None) -> torch.Tensor:
    """(B, 1, H, W) float, 1 = removed: the centre square of side ``fraction * H`` (Pathak et al.
    2016: "central region", a quarter of the image area at 0.5)."""
    side = round(image_size * fraction)
    start = (image_size - side) // 2
    mask = torch.zeros(batch, 1, image_size, image_size, device=device)
    mask[..., start:start + side, start:start + side] = 1
    return mask


def random_block_mask(batch: int, image_size: int, num_blocks: int = 4, fraction: float = 0.25,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(B, 1, H, W) float, 1 = removed: ``num_blocks`` squares of side ``fraction * H`` at uniform
    random positions, possibly overlapping (Pathak et al. 2016: "random block", smaller
    masks covering up to 1/4 of the image at 4 blocks of side H/4)."""
    side = max(1, round(image_size * fraction))
    corners = torch.randint(image_size - side + 1, (batch, num_blocks, 2), generator=generator)
    pixels = torch.arange(image_size)
    inside_rows = (pixels >= corners[..., :1]) & (pixels < corners[..., :1] + side)  # (B, n, H)
    inside_cols = (pixels >= corners[..., 1:]) & (pixels < corners[..., 1:] + side)  # (B, n, W)
    blocks = inside_rows[..., :, None] & inside_cols[..., None, :]  # (B, n, H, W)
    return blocks.any(dim=1, keepdim=True).float().to(device)
