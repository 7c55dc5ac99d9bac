"""DaGAN's depth-aware cross-modal attention as a module on ``ops.cross_modal_attention``."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops.layout import is_channels_last as _is_channels_last

Tensor = torch.Tensor


class CrossModalAttention(nn.Module):
    """out = gamma * softmax(Q K^T * scale) V + feat, with Q = ReLU(query_conv(source)),
    K = ReLU(key_conv(feat)), V = ReLU(value_conv(feat)) (1x1 convs), one head, N = H*W tokens.

    source (B,Cs,H,W) (DaGAN: source-depth features), feat (B,C,H,W) (DaGAN: warped image features)
    -> (B,C,H,W). The attribute names match DaGAN's ``AttnModule`` (``query_conv``, ``key_conv``,
    ``value_conv``, ``gamma``); DaGAN uses ``scale=1.0`` (no 1/sqrt(d)), Dqk = C/8 = 32, Dv = C = 256.
    The (B,N,N) attention map is never built, except by ``attention_map`` or ``return_attention``.
    """

    def __init__(self, in_dim: int = 256, qk_dim: Optional[int] = None, source_dim: Optional[int] = None,
                 scale: Optional[float] = 1.0):
        super().__init__()
        qk_dim = in_dim // 8 if qk_dim is None else qk_dim
        source_dim = in_dim if source_dim is None else source_dim
        self.scale = 1.0 / math.sqrt(qk_dim) if scale is None else float(scale)
        self.query_conv = nn.Conv2d(source_dim, qk_dim, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, qk_dim, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    @staticmethod
    def _linear_tokens(x: Tensor, conv: nn.Conv2d) -> Tensor:
        """ReLU(1x1 conv) in token layout: (B,C,H,W) -> (B,H*W,Cout), one GEMM, no NCHW round trip."""
        tokens = x.flatten(2).transpose(1, 2)
        return F.relu(F.linear(tokens, conv.weight.flatten(1), conv.bias), inplace=True)

    def query(self, source: Tensor) -> Tensor:
        """Q (B,1,N,Dqk) from the source features; depends on the source only, so callers may reuse it."""
        return self._linear_tokens(source, self.query_conv).unsqueeze(1)

    def keys_values(self, feat: Tensor) -> Tuple[Tensor, Tensor]:
        """(K (B,1,N,Dqk), V (B,1,N,Dv)) from the features, each contiguous."""
        return (self._linear_tokens(feat, self.key_conv).unsqueeze(1),
                self._linear_tokens(feat, self.value_conv).unsqueeze(1))

    def forward(self, source: Tensor, feat: Tensor, *, query: Optional[Tensor] = None,
                return_attention: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """``query``: ``self.query(source)`` computed already (then ``source`` may be None).
        ``return_attention``: also return the (B,N,N) map (materialised: small N or visualisation only)."""
        B, C, H, W = feat.shape
        q = self.query(source) if query is None else query
        if q.shape[0] != B:
            q = q.expand(B, *q.shape[1:]).contiguous()  # kernels get dense operands
        k, v = self.keys_values(feat)
        fmt = torch.channels_last if _is_channels_last(feat) else torch.contiguous_format
        if return_attention:
            attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
            out = torch.matmul(attn, v).squeeze(1).transpose(1, 2).reshape(B, C, H, W)
            result = torch.addcmul(feat, self.gamma, out).contiguous(memory_format=fmt)
            return result, attn.squeeze(1)
        # feat seen as tokens (B,1,N,C) is a strided view; the op adds it in its epilogue (fused into the
        # Triton kernel at inference) and then writes the result laid out like feat, so the (B,C,H,W)
        # view below needs no copy and the convolutions that follow see the layout they were given
        tokens = feat.flatten(2).transpose(1, 2).unsqueeze(1)
        if tokens.dtype == q.dtype:
            out = ops.cross_modal_attention(q, k, v, self.scale, residual=tokens, gamma=self.gamma)
        else:  # mixed precision (e.g. fp16 projections of fp32 features): type promotion as in DaGAN
            out = torch.addcmul(tokens, self.gamma, ops.cross_modal_attention(q, k, v, self.scale))
        return out.squeeze(1).transpose(1, 2).reshape(B, C, H, W).contiguous(memory_format=fmt)

    @torch.no_grad()
    def attention_map(self, source: Tensor, feat: Tensor, max_tokens: int = 4096) -> Tensor:
        """The (B,N,N) softmax attention map, rows = queries (source positions), for visualisation.
        Refuses N > ``max_tokens`` (the map has N*N entries; 4096 tokens = 64 MiB per image in fp32)."""
        N = feat.shape[2] * feat.shape[3]
        if N > max_tokens:
            raise ValueError(f"attention_map: {N} tokens would build a {N}x{N} map per image; pass max_tokens={N} "
                             f"to allow it, or use smaller features")
        q = self.query(source)
        k, _ = self.keys_values(feat)
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1).squeeze(1)
