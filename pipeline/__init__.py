"""pipeline: the library under the CLI. ``config`` (the run config: schema, loading, validation), then
rooms: ``data/`` (shard loaders, augmentation), ``train/`` (the training loop, strategies, checkpoints),
``evaluate/`` (kNN, linear probe, fine-tuning, temporal order), ``registry/`` (MLflow tracking and
registry, timm export, gates and model cards)."""
