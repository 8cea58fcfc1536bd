"""Multi-crop (Caron et al. 2020, SwAV sec. 3.2; used by DINO, iBOT, DINOv2): a few *global* views
at full resolution and any number of *local* views at a lower one, so that a model learns
"local-to-global" correspondences at little extra cost.

The contract between a method and the rest of the pipeline:

- The method class sets ``num_views`` to its number of global views (e.g. 2) and
  ``multi_crop = True``: it then takes ``views = [global_1, ..., global_G, local_1, ..., local_L]``
  for any L >= 0, each a (B, C, h, w) batch; the global views share one size, a local view may have
  any size. ``data.views`` lists the global views first (e.g. ``count: 2`` at 224 px, then
  ``count: 8`` at 96 px); ``pipeline.config`` checks that before training (``check_view_sizes``).
- The loaders (torch and DALI) and the trainer pass such a list through untouched: one tensor per
  view, each stacked over the batch at its own size.
- Inside the method, :func:`split_views` separates the global from the local views and
  :func:`forward_by_resolution` runs an encoder once per run of consecutive same-size views (the
  globals in one call, the locals in another), as DINO's ``MultiCropWrapper``: 2 + L views cost 2
  backbone calls, not 2 + L, and BatchNorm statistics are those of each resolution group.

A ViT takes views of another size than its ``img_size`` only when built with
``dynamic_img_size=True`` (timm then resamples the position embedding to each input's patch grid,
as DINO's ``interpolate_pos_encoding``); ``check_view_sizes`` says so before training.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ssl_foundry.models.backbones import is_vit


def split_views(views: list[torch.Tensor], num_global: int, method: str) -> tuple[list[torch.Tensor],
                                                                                    list[torch.Tensor]]:
    """``(global views, local views)`` of a multi-crop batch: the first ``num_global`` views, which
    must share one shape, and the rest. Fewer views is a ValueError naming ``data.views``."""
    if len(views) < num_global:
        raise ValueError(f"{method} takes {num_global} global views (then any number of local views), got "
                         f"{len(views)}: check data.views in the recipe")
    global_views, local_views = views[:num_global], views[num_global:]
    shapes = {tuple(v.shape) for v in global_views}
    if len(shapes) > 1:
        raise ValueError(f"{method}: the {num_global} global views must have one shape, got {sorted(shapes)}: "
                         f"list them first in data.views, at one size")
    return global_views, local_views


def resolution_groups(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``views`` cut into runs of consecutive views of the same spatial size (in order)."""
    groups: list[list[torch.Tensor]] = []
    for view in views:
        if groups and groups[-1][0].shape[-2:] == view.shape[-2:]:
            groups[-1].append(view)
        else:
            groups.append([view])
    return groups


def forward_by_resolution(encoder: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> torch.Tensor:
    """``encoder`` on every view, one call per resolution group (its views concatenated along the
    batch): returns the outputs of all views concatenated in view order, ``(len(views) * B, ...)``,
    so ``.chunk(len(views))`` gives them back per view."""
    return torch.cat([encoder(torch.cat(group)) for group in resolution_groups(views)])


def check_view_sizes(sizes: list[tuple[int, int] | None], num_global: int, backbone: nn.Module) -> None:
    """What a multi-crop method needs of ``data.views``, given each view's output size (``None``:
    the view keeps the image's size): at least ``num_global`` views, the global ones first and of one
    size; with a ViT, views of several sizes need ``dynamic_img_size`` and every size a multiple of
    the patch size. Raises ValueError naming the key and the fix."""
    if len(sizes) < num_global:
        raise ValueError(f"data.views makes {len(sizes)} view(s); the method takes {num_global} global views "
                         f"first (then any number of local views)")
    if len({sizes[i] for i in range(num_global)}) > 1:
        raise ValueError(f"data.views: the first {num_global} views are the global ones and must have one size, "
                         f"got {', '.join(map(str, sizes[:num_global]))}: list the global views first, at one size")
    known = {s for s in sizes if s is not None}
    if not is_vit(backbone) or len(known) + (None in sizes) <= 1:
        return
    if not backbone.dynamic_img_size:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(known))
        raise ValueError(f"data.views makes views of several sizes ({shown}) but the ViT takes one: set "
                         f"model.backbone_args.dynamic_img_size=true (its position embedding is then resampled "
                         f"to each view's patch grid)")
    patch = backbone.patch_embed.patch_size
    odd = sorted(s for s in known if s[0] % patch[0] or s[1] % patch[1])
    if odd and not backbone.patch_embed.dynamic_img_pad:
        raise ValueError(f"data.views: view size(s) {', '.join(f'{h}x{w}' for h, w in odd)} are not multiples of "
                         f"the ViT's {patch[0]}x{patch[1]} patches: change the sizes, or set "
                         f"model.backbone_args.dynamic_img_pad=true")
