"""models: timm backbones, heads, losses and self-supervised methods (see models.registry)."""
