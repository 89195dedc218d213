"""Experiments built on the trainer: `python -m eit_fast.experiments.small_data` (EIT vs ViT vs ResNet on
seeded subsets)."""
