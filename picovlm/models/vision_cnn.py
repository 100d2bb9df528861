"""Convolutional vision encoder: pixels -> a grid of visual tokens.

This is SupraVL-Nano's encoder. With the `supravl-nano` preset (img_size 112, channels
16/32/64, grid 4, lm_hidden_dim 128) the shapes are:

    images                      (B, 3, 112, 112)   normalised with ImageNet mean/std
    conv1: Conv3x3/2-BN-ReLU    (B, 16, 56, 56)
    conv2: Conv3x3/2-BN-ReLU    (B, 32, 28, 28)
    conv3: Conv3x3/2-BN-ReLU    (B, 64, 14, 14)
    pool: AdaptiveAvgPool(4x4)  (B, 64, 4, 4)
    flatten + transpose         (B, 16, 64)        one token per grid cell, row-major
    proj: Linear 64 -> 128      (B, 16, 128)       visual tokens in the decoder's width

A 4x4 grid rather than one global vector lets the decoder look at different regions of
the image for different words. Module names (`conv1.0`, `conv1.1`, ..., `proj`) are the
published checkpoint's, so its weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from picovlm.config import VLMConfig


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution with stride 2 (halves H and W), batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CNNEncoder(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        channels = (3, *cfg.cnn_channels)
        # conv1, conv2, ... as named attributes (not a list) to keep the published key names.
        self.n_convs = len(cfg.cnn_channels)
        for i in range(self.n_convs):
            self.add_module(f"conv{i + 1}", conv_bn_relu(channels[i], channels[i + 1]))
        self.pool = nn.AdaptiveAvgPool2d((cfg.cnn_grid, cfg.cnn_grid))
        self.proj = nn.Linear(channels[-1], cfg.lm_hidden_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images -> (B, grid*grid, lm_hidden_dim) visual tokens."""
        x = images
        for i in range(self.n_convs):
            x = getattr(self, f"conv{i + 1}")(x)  # (B, C_i, H / 2^i, W / 2^i)
        x = self.pool(x)  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)
        return self.proj(x)  # (B, grid*grid, D)
