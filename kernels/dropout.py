"""In-kernel dropout: the keep decision of one element from (seed, stream, element offset).

Forward and backward call the same function with the same offsets, so the backward regenerates the
forward's mask without storing it; `keep_mask_kernel` materialises it for tests (the debug switch).
Streams separate the three dropout sites of a mixer so their masks are independent.
"""
import triton
import triton.language as tl

STREAM_ATTN, STREAM_CONV, STREAM_PROJ = 0, 1, 2


@triton.jit
def keep(seed_ptr, stream, offset, p):
    """True where the element at int64 `offset` of dropout stream `stream` survives dropout with rate p."""
    seed = tl.load(seed_ptr).to(tl.int64) * 3 + stream
    return tl.rand(seed, offset) >= p


@triton.jit
def keep_mask_kernel(out_ptr, seed_ptr, stream, numel, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    tl.store(out_ptr + offs, keep(seed_ptr, stream, offs, p).to(tl.int8), mask=m)


def launch_keep_mask(out, seed, stream: int, p: float, wrap=lambda k: k):
    """Fill the int8 tensor `out` (contiguous; element i = offset i) with the keep mask of `stream`."""
    BLOCK = 1024
    n = out.numel()
    wrap(keep_mask_kernel)[(triton.cdiv(n, BLOCK),)](out, seed, stream, n, p, BLOCK=BLOCK)
