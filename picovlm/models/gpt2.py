"""GPT-2 style transformer blocks (pre-LayerNorm), as in SupraVL-Nano's decoder.

References: Radford et al. 2019 (GPT-2); Karpathy's nanoGPT `model.py`.

One block, for a sequence x of shape (B, T, D) with D = lm_hidden_dim, H = lm_n_heads,
hd = D / H:

    x = x + attn(ln1(x))
        qkv: Linear D -> 3D, no bias    (B, T, 3D) -> q, k, v each (B, H, T, hd)
        causal softmax(q k^T / sqrt(hd)) v            (B, H, T, hd) -> (B, T, D)
        proj: Linear D -> D, no bias    (B, T, D)
    x = x + mlp(ln2(x))
        fc1: Linear D -> lm_inter_dim, GELU, fc2: Linear lm_inter_dim -> D

Attention uses `scaled_dot_product_attention`, which picks a fused kernel where one
exists. With a `KVCache` the block sees only the new positions; keys and values of earlier
positions come from the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from picovlm.config import VLMConfig
from picovlm.kv_cache import KVCache


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: VLMConfig, layer_idx: int):
        super().__init__()
        self.n_heads = cfg.lm_n_heads
        self.layer_idx = layer_idx  # which slice of a KVCache belongs to this layer
        self.dropout = cfg.lm_dropout
        self.qkv = nn.Linear(cfg.lm_hidden_dim, 3 * cfg.lm_hidden_dim, bias=False)
        self.proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_hidden_dim, bias=False)
        # picovlm.explain sets record_attention: the softmax is then computed explicitly, used for
        # the output, and kept in `attention` (B, H, T, T_keys), so the maps are the real weights.
        self.record_attention = False
        self.attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        # (B, T, D) -> (B, H, T, hd)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is None or cache.pos == 0:
            mask, is_causal = None, True  # plain causal attention over the T positions
            if cache is not None:
                cache.update(self.layer_idx, k, v)
        else:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, pos + T, hd)
            # The T new queries sit at positions pos .. pos+T-1: each sees the whole cache
            # plus the new keys up to itself.
            mask = _causal_mask_with_offset(T, k.shape[2], x.device) if T > 1 else None
            is_causal = False
        if self.record_attention:
            y = self._attend_and_record(q, k, v, mask, is_causal)
        else:
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj(y)

    def _attend_and_record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd)) v written out, keeping the weights. (B, H, T, hd) out."""
        t_q, t_k = q.shape[2], k.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T_keys)
        if is_causal:
            mask = _causal_mask_with_offset(t_q, t_k, q.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        self.attention = scores.softmax(dim=-1)
        return self.attention @ v


def _causal_mask_with_offset(t_new: int, t_total: int, device: torch.device) -> torch.Tensor:
    """(t_new, t_total) boolean mask: query i may see keys 0 .. t_total - t_new + i."""
    offset = t_total - t_new
    rows = torch.arange(t_new, device=device)[:, None]
    cols = torch.arange(t_total, device=device)[None, :]
    return cols <= rows + offset


class MLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim)
        self.fc2 = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim)
        self.dropout = nn.Dropout(cfg.lm_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, cfg: VLMConfig, layer_idx: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.lm_hidden_dim)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln2 = nn.LayerNorm(cfg.lm_hidden_dim)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))
