"""The hand-off: MLflow tracking and registry, timm backbone export, gates and model cards, plots."""
