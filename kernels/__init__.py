"""Triton kernels of eit_fast (installed as eit_fast.kernels): @triton.jit functions and their launchers.

Kernels know tensors only as pointers, strides and sizes. Launchers take a `wrap` callable so the op layer
can pass torch.library.wrap_triton (what torch.compile traces); called directly they launch eagerly.
`INTERPRET` is whether TRITON_INTERPRET=1 was set when these modules were imported: the decorator reads
it once, at definition time.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
