"""pipeline: shard loading, augmentation, the trainer, checkpoints, tracking, export, evaluation."""
