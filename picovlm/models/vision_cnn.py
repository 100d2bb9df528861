"""Convolutional vision encoder: pixels -> a grid of visual tokens.

This is SupraVL-Nano's encoder. With the `supravl-nano` preset (img_size 112, channels
16/32/64, grid 4, lm_hidden_dim 128) the shapes are:

    images                      (B, 3, 112, 112)   normalised with ImageNet mean/std
    conv1: Conv3x3/2-BN-ReLU    (B, 16, 56, 56)
    conv2: Conv3x3/2-BN-ReLU    (B, 32, 28, 28)
    conv3: Conv3x3/2-BN-ReLU    (B, 64, 14, 14)
    pool: AdaptiveAvgPool(4x4)  (B, 64, 4, 4)
    flatten + transpose         (B, 16, 64)        one token per grid cell, row-major
    dropout (vision_dropout)    (B, 16, 64)        training only; off in this preset
    proj: Linear 64 -> 128      (B, 16, 128)       visual tokens in the decoder's width

A 4x4 grid rather than one global vector lets the decoder look at different regions of
the image for different words. Module names (`conv1.0`, `conv1.1`, ..., `proj`) are the
published checkpoint's, so its weights load unchanged.

`cnn_res_blocks = N` deepens each stage without changing any shape: after `conv{i}` come N
residual blocks `res{i}` that keep (B, C_i, H_i, W_i),

    x + BN(Conv1x1(ReLU(BN(DWConv3x3(x)))))   then ReLU

a depthwise 3x3 (one filter per channel) and a 1x1 across channels: C*(C + 9) weights instead of
the 9*C*C of a full 3x3 conv, so the 1 M-parameter budget can afford depth.
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


class ResidualDWBlock(nn.Module):
    """x + BN(Conv1x1(ReLU(BN(DWConv3x3(x))))), then ReLU: same shape in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.pw(torch.relu(self.bn1(self.dw(x)))))
        return torch.relu(x + branch)


class CNNEncoder(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        channels = (3, *cfg.cnn_channels)
        # conv1, conv2, ... as named attributes (not a list) to keep the published key names.
        self.n_convs = len(cfg.cnn_channels)
        for i in range(self.n_convs):
            self.add_module(f"conv{i + 1}", conv_bn_relu(channels[i], channels[i + 1]))
            if cfg.cnn_res_blocks:
                blocks = [ResidualDWBlock(channels[i + 1]) for _ in range(cfg.cnn_res_blocks)]
                self.add_module(f"res{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d((cfg.cnn_grid, cfg.cnn_grid))
        self.feature_dropout = nn.Dropout(cfg.vision_dropout)
        self.proj = nn.Linear(channels[-1], cfg.lm_hidden_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images -> (B, grid*grid, lm_hidden_dim) visual tokens."""
        x = images
        for i in range(1, self.n_convs + 1):
            x = getattr(self, f"conv{i}")(x)  # (B, C_i, H / 2^i, W / 2^i)
            if hasattr(self, f"res{i}"):
                x = getattr(self, f"res{i}")(x)  # same shape, one stage deeper
        x = self.pool(x)  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)
        return self.proj(self.feature_dropout(x))  # (B, grid*grid, D)
