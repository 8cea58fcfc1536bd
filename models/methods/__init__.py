"""One module per self-supervised method; each registers itself in models.registry."""
