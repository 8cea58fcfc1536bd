"""Training: the loop (``trainer``), process runtime, strategies (DDP, DeepSpeed), checkpoints, optimizer."""
