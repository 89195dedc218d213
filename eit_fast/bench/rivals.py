"""What a user gets without eit_fast's kernels: the reference model with its attention through PyTorch's
fused SDPA, head sizes zero-padded to a multiple of 8 (EIT's head sizes 2..33 are mostly not, and SDPA's
fast kernels want them to be). Zero columns change neither q.k nor, after slicing, the output, so the model
computes the reference function."""
from __future__ import annotations

import torch.nn.functional as F

from ..models.eit import Attention


class SDPAPaddedAttention(Attention):
    """Attention whose core is F.scaled_dot_product_attention on heads padded to a multiple of 8."""

    def forward(self, x):
        B, N, C = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        pad = -hd % 8
        if pad:
            q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0,
                                           scale=self.scale)[..., :hd]
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))


def use_sdpa_pad8(model):
    """Swap every reference Attention of `model` for SDPAPaddedAttention in place; return the model."""
    for m in model.modules():
        if type(m) is Attention:
            m.__class__ = SDPAPaddedAttention
    return model
