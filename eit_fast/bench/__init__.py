"""Whole-model benchmarks (`python -m eit_fast.bench`): inference and training steps of EIT models on every
path a user could take (reference eager, reference with PyTorch SDPA on padded heads, torch.compile, fused,
fused under torch.compile, auto), measured side by side, with the modelled H100 floor beside them
(docs/design.md section 6)."""
