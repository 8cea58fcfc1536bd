"""Training data: shard loaders (torch workers or NVIDIA DALI), augmentation backends, clip decoding."""
