"""Modality projector: ViT patch embeddings -> fewer, wider visual tokens in the decoder's width.

As in nanoVLM (and Idefics3 before it), two steps: a pixel shuffle that merges each r x r
neighbourhood of the patch grid into one token, then one Linear into the language model's
width. With nanoVLM's 222M configuration (SigLIP-B/16-224, r = 2, SmolLM2-135M's D_lm = 576):

    patch embeddings            (B, 196, 768)     a 14 x 14 grid of patches
    view as a grid              (B, 14, 14, 768)
    pixel_shuffle, r = 2        (B, 49, 3072)     7 x 7 tokens, each 2 x 2 patches side by side
    proj: Linear 3072 -> 576    (B, 49, 576)      visual tokens in the decoder's width

The shuffle trades sequence length for width without discarding anything: every patch
embedding is still there, in the channels of the token that covers it, and it is the Linear
that learns what to keep. The decoder's attention cost falls by r**4 (r**2 fewer tokens on
each side of the attention matrix). Visual tokens per image, (vit_img_size / vit_patch_size / r)**2:

    224 px, patch 16, r = 2     14 x 14 = 196 patches -> 7 x 7 = 49 tokens   (nanoVLM-222M)
    512 px, patch 16, r = 4     32 x 32 = 1024 patches -> 8 x 8 = 64 tokens  (nanoVLM's later
                                SigLIP2-B/16-512 configuration)
    224 px, patch 16, r = 1     196 tokens: no shuffle, the Linear alone

Token (i, j) of the output holds the patches (i*r + a, j*r + b) for a, b in 0..r-1, in the order
a-major then b, each patch's D channels contiguous. The order matters only in that a trained
projector expects the same one; it is nanoVLM's.
"""

from __future__ import annotations

import torch
from torch import nn

from picovlm.config import VLMConfig


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, S*S, D) patches of a square S x S grid -> (B, (S/r)**2, D * r**2) tokens; see the module docstring."""
    B, N, D = x.shape
    S = int(round(N**0.5))
    if S * S != N:
        raise ValueError(f"pixel_shuffle needs a square grid of patches, got {N} patches")
    if S % r:
        raise ValueError(f"pixel_shuffle: the {S}x{S} patch grid is not divisible by the factor r={r}")
    s = S // r
    x = x.view(B, s, r, s, r, D)  # grid row = i*r + a, grid column = j*r + b -> (B, i, a, j, b, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, i, j, a, b, D): each token's r x r patches together
    return x.reshape(B, s * s, r * r * D)  # (B, s*s, r*r*D)


class ModalityProjector(nn.Module):
    """(B, n_patches, vit_hidden_dim) -> (B, n_patches / r**2, lm_hidden_dim) visual tokens."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.r = cfg.mp_pixel_shuffle_factor
        # No bias, as nanoVLM: the decoder's own embeddings and norms absorb any offset.
        self.proj = nn.Linear(cfg.vit_hidden_dim * self.r**2, cfg.lm_hidden_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_shuffle(x, self.r))  # (B, n_patches / r**2, lm_hidden_dim)
