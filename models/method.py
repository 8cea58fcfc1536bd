"""The contract between a self-supervised method and the rest of the pipeline.

A method is a :class:`Method`: an ``nn.Module`` that owns its backbone (``self.backbone``, the
network that is exported), its heads and any target networks. What it declares, as class
attributes read by the config checks, the loaders and the trainer (nothing else about a method is
known outside ``models/``):

- ``num_views``: how many augmented views of each sample it takes (``data.views`` must make
  that many). With ``multi_crop = True`` this is the number of *global* views, all of one shape,
  which come first and are followed by any number of *local* views (SwAV, DINO).
- ``input_kind``: ``"image"`` (each view a ``(B, C, H, W)`` batch) or ``"clip"`` (each view a
  ``(B, T, C, H, W)`` batch of clips, the video methods).
- ``uses_labels``: it also takes the batch's class labels ``(B,)``, -1 where a label is hidden
  (``data.labelled_fraction``; S4L, SLA).
- ``fixed_lr_modules``: names of submodules whose parameters keep the base lr while the rest
  follow the schedule (``pipeline.train.optim``; SimSiam's predictor); none by default.
- ``exported_backbone``: the dotted name of the submodule exported as the trained backbone;
  ``"backbone"`` unless the method says otherwise (DINO exports its teacher's).

A distillation method takes a ``teacher`` argument after the backbone: the pipeline hands it the
frozen network named by ``model.teacher`` (``models.registry.takes_teacher``).

What it implements:

- ``compute_loss(views)`` (``compute_loss(views, labels)`` with ``uses_labels``): its maths on
  a batch that is already checked, returning ``{"loss": scalar, **other values to log}``.
- optionally ``on_step_end(step, total_steps)``, called after every optimizer step (momentum
  encoders' EMA, prototype renormalisation).
- optionally, for a clip method, ``frames_needed(method_args)``: the fewest frames per clip its
  pretext task needs, checked against ``data.clip_frames`` before training.

``forward`` is this class's: it checks the input once, against the declaration (view count, the
input kind's tensor rank, one batch size, labels), with an error naming ``data.views``, then calls
``compute_loss``. Register the class with ``@register_method("name")`` (``models.registry``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

# input_kind -> the shape of each view's tensor
INPUT_SHAPES = {"image": ("B", "C", "H", "W"), "clip": ("B", "T", "C", "H", "W")}


class Method(nn.Module):
    num_views: ClassVar[int]
    multi_crop: ClassVar[bool] = False
    input_kind: ClassVar[str] = "image"
    uses_labels: ClassVar[bool] = False
    exported_backbone: ClassVar[str] = "backbone"
    fixed_lr_modules: tuple[str, ...] = ()
    method_name: ClassVar[str]  # set by @register_method

    @classmethod
    def check_view_count(cls, count: int) -> None:
        """``count`` views (the sum of ``data.views``' counts) are what this method takes, or a
        ValueError naming ``data.views``."""
        if cls.multi_crop and count < cls.num_views:
            raise ValueError(f"data.views: method '{cls.method_name}' takes {cls.num_views} global view(s) first, "
                             f"then any number of local views; the recipe makes {count} (the sum of the views' count)")
        if not cls.multi_crop and count != cls.num_views:
            raise ValueError(f"data.views: method '{cls.method_name}' takes {cls.num_views} view(s) per sample, "
                             f"the recipe makes {count} (the sum of the views' count)")

    @staticmethod
    def frames_needed(method_args: dict[str, Any]) -> int:
        """The fewest frames per clip the method needs with ``method_args`` (its signature's defaults
        filled in, ``models.video.min_clip_frames``): 1 unless a clip method's task needs more."""
        return 1

    def check_input(self, views: list[torch.Tensor], labels: torch.Tensor | None) -> None:
        """The batch matches the declaration: view count, every view a tensor of the input kind's
        rank, one batch size, and labels exactly when the method takes them."""
        self.check_view_count(len(views))
        name, dims = self.method_name, INPUT_SHAPES[self.input_kind]
        for view in views:
            if view.dim() != len(dims):
                raise ValueError(f"{name} takes {self.input_kind}s of shape ({', '.join(dims)}), got a tensor of "
                                 f"shape {tuple(view.shape)}: train it on " + (
                                     "clip shards (foundry prep video)" if self.input_kind == "clip" else "images"))
        if len({view.shape[0] for view in views}) > 1:
            raise ValueError(f"{name}: the views hold different batch sizes {[view.shape[0] for view in views]}")
        if self.multi_crop and len({view.shape for view in views[:self.num_views]}) > 1:
            raise ValueError(f"{name}: its {self.num_views} global views must have one shape, got "
                             f"{[tuple(view.shape) for view in views[:self.num_views]]}: list them first in "
                             f"data.views, at one size")
        if not self.uses_labels:
            if labels is not None:
                raise ValueError(f"{name} takes no labels (uses_labels is False)")
            return
        if labels is None or labels.shape != views[0].shape[:1]:
            raise ValueError(f"{name} takes the batch's labels, shape ({views[0].shape[0]},), got "
                             f"{None if labels is None else tuple(labels.shape)}")

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.check_input(views, labels)
        return self.compute_loss(views, labels) if self.uses_labels else self.compute_loss(views)

    def compute_loss(self, views: list[torch.Tensor], labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(views)")

    def on_step_end(self, step: int, total_steps: int) -> None:
        """After optimizer step ``step`` (1-based) of ``total_steps``; nothing by default."""
