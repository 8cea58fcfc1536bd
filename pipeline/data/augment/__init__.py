"""Augmentation: one declarative spec (``spec``), compiled by two backends: torchvision v2
(``torch_backend``, CPU loader workers) and NVIDIA DALI (``dali_backend``, GPU or DALI's CPU
backend). The DALI backend is imported on its own (``pipeline.augment.dali_backend``): DALI is
only needed when ``data.backend`` is ``dali``."""
from ssl_foundry.pipeline.data.augment.torch_backend import MultiViewTransform, eval_transform, eval_views

__all__ = ["MultiViewTransform", "eval_transform", "eval_views"]
