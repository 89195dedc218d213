"""Fused operations registered with torch.library (layer 3): one file per op."""
