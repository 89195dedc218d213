"""Data sets and loaders for training."""
