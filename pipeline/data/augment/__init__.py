"""Augmentation: one declarative spec (``spec``), compiled by two backends: torchvision v2
(``torch_backend``, CPU loader workers) and NVIDIA DALI (``dali_backend``, GPU or DALI's CPU
backend). Each is imported on its own: DALI is only needed when ``data.backend`` is ``dali``, and the
config parses the spec without loading torchvision."""
