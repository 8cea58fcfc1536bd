"""Evaluation of frozen or fine-tuned backbones: kNN, linear probe, fine-tuning, temporal order."""
