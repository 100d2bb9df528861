"""Vision transformer: pixels -> one embedding per image patch, SigLIP's vision tower.

The architecture is the ViT of Dosovitskiy et al. 2020 ("An Image is Worth 16x16 Words") in the
form SigLIP uses (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): no class
token, learned absolute position embeddings, pre-LayerNorm blocks, tanh-approximated GELU, a
final LayerNorm. It computes what Hugging Face's `SiglipVisionModel` returns as
`last_hidden_state`; the attention-pooling head on top of it is left out, as in nanoVLM, because
a VLM wants every patch, not one pooled vector. picovlm.siglip loads SigLIP's weights into it.

With the default config (SigLIP-B/16-224: vit_img_size 224, vit_patch_size 16, D = 768,
12 heads, 12 blocks, MLP width 3072) the shapes are:

    images                           (B, 3, 224, 224)   SigLIP normalises with mean = std = 0.5
    patch_embedding: Conv16x16/16    (B, 768, 14, 14)   one linear map of each 16x16x3 patch
    flatten + transpose              (B, 196, 768)      patches row-major: index = row * 14 + col
    + position_embedding             (B, 196, 768)      one learned vector per grid position
    blocks: ViTBlock x 12            (B, 196, 768)
    post_layernorm                   (B, 196, 768)      patch embeddings

One block, with residual stream x:

    x = x + out_proj(attention(q_proj(ln1(x)), k_proj(...), v_proj(...)))   12 heads of 64, every
                                                                            patch sees every patch
    x = x + fc2(gelu_tanh(fc1(ln2(x))))                                     768 -> 3072 -> 768

Normalising before each sub-layer (pre-LN) leaves the residual path an identity, which is what
lets deep stacks train without warm-up tricks; the final LayerNorm then rescales the stream once.
The attribute names map one to one onto Hugging Face's key names (see picovlm.siglip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from picovlm.config import VLMConfig


class ViTAttention(nn.Module):
    """Multi-head self-attention over all patches (not causal: an image has no reading order)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.n_heads = cfg.vit_n_heads
        self.head_dim = cfg.vit_hidden_dim // cfg.vit_n_heads
        self.dropout = cfg.vit_dropout
        # Separate q/k/v projections, with bias, exactly as SigLIP's checkpoints store them.
        self.q_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim)
        self.k_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim)
        self.v_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim)
        self.out_proj = nn.Linear(cfg.vit_hidden_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, N, head_dim)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, N, D)  # heads side by side again
        return self.out_proj(y)


class ViTMLP(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_hidden_dim, cfg.vit_inter_dim)
        self.fc2 = nn.Linear(cfg.vit_inter_dim, cfg.vit_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SigLIP was trained with the tanh approximation of GELU ("gelu_pytorch_tanh"); the exact
        # erf form differs by up to 4.7e-4 per activation, which compounds through the blocks.
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.attn = ViTAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.mlp = ViTMLP(cfg)
        self.drop = nn.Dropout(cfg.vit_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))  # (B, N, D)
        return x + self.drop(self.mlp(self.ln2(x)))  # (B, N, D)


class ViT(nn.Module):
    """SigLIP's vision tower without its pooling head: (B, 3, H, W) -> (B, n_patches, vit_hidden_dim)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.vit_img_size // cfg.vit_patch_size
        self.n_patches = self.grid**2
        # A convolution whose stride equals its kernel cuts the image into non-overlapping patches
        # and applies the same Linear(3 * P * P -> D) to each, in one call.
        self.patch_embedding = nn.Conv2d(3, cfg.vit_hidden_dim, kernel_size=cfg.vit_patch_size,
                                         stride=cfg.vit_patch_size)
        self.position_embedding = nn.Parameter(torch.empty(self.n_patches, cfg.vit_hidden_dim))
        self.blocks = nn.ModuleList([ViTBlock(cfg) for _ in range(cfg.vit_n_blocks)])
        self.post_layernorm = nn.LayerNorm(cfg.vit_hidden_dim, eps=cfg.vit_ln_eps)
        self.apply(self._init_weights)
        # SigLIP's initialisation: position vectors of unit norm in expectation.
        nn.init.normal_(self.position_embedding, std=cfg.vit_hidden_dim**-0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Only for a ViT trained from scratch; a pretrained one overwrites all of this.
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, vit_img_size, vit_img_size) normalised images -> (B, n_patches, vit_hidden_dim)."""
        size = self.cfg.vit_img_size
        if images.shape[-2:] != (size, size):
            # The position embeddings fix the grid; resize images to vit_img_size before encoding.
            raise ValueError(f"the ViT expects {size}x{size} images, got {tuple(images.shape[-2:])}")
        x = self.patch_embedding(images)  # (B, D, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, n_patches, D), row-major over the grid
        x = x + self.position_embedding  # (n_patches, D) broadcast over the batch
        for block in self.blocks:
            x = block(x)  # (B, n_patches, D)
        return self.post_layernorm(x)


def vit_param_count(cfg: VLMConfig) -> int:
    """ViT parameters from the config alone, as `sum(p.numel() for p in ViT(cfg).parameters())`.

    SigLIP-B/16-224 gives 85,797,120 (nanoVLM's "85M"); HF's SiglipVisionModel adds 7,087,104 for
    the attention-pooling head, 92,884,224 in all.
    """
    D, F_, P = cfg.vit_hidden_dim, cfg.vit_inter_dim, cfg.vit_patch_size
    n_patches = (cfg.vit_img_size // P) ** 2
    embeddings = (3 * P * P * D + D) + n_patches * D  # patch conv (weight + bias) + positions
    attention = 4 * (D * D + D)  # q, k, v, out
    mlp = (D * F_ + F_) + (F_ * D + D)
    layer_norms = 2 * 2 * D  # ln1, ln2: weight + bias each
    return embeddings + cfg.vit_n_blocks * (attention + mlp + layer_norms) + 2 * D  # + post_layernorm
