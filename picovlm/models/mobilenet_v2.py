"""A frozen ImageNet-pretrained MobileNetV2 as the vision encoder: pixels -> a grid of visual tokens.

`MobileNetV2` is the architecture of Sandler et al. 2018 ("MobileNetV2: Inverted Residuals and
Linear Bottlenecks") at width 1.0, written so that its state-dict keys are torchvision's
(`features.1.conv.0.0.weight`, ..., `classifier.1.bias`): torchvision's ImageNet file
`mobilenet_v2-b0353104.pth` loads into it with strict=True (see picovlm.pretrained).

`MobileNetV2Encoder` keeps only the convolutional `features` (2.2 M parameters), frozen, and
trains a projector on top. With the `pico-mobilenet` preset (img_size 320, grid 7, D = 192):

    images                              (B, 3, 320, 320)   normalised with ImageNet mean/std
    features.0: Conv3x3/2-BN-ReLU6      (B, 32, 160, 160)
    features.1-17: inverted residuals   (B, 320, 10, 10)   strides 1,2,2,2,1,2,1 -> /32
    features.18: Conv1x1-BN-ReLU6       (B, 1280, 10, 10)  frozen, no gradients, BN in eval mode
    pool: AdaptiveAvgPool(7x7)          (B, 1280, 7, 7)    overlapping windows of the 10x10 map
                                                           (training with --feature-crop pools a
                                                           random crop of it instead)
    flatten + transpose                 (B, 49, 1280)      one token per grid cell, row-major
    dropout (vision_dropout)            (B, 49, 1280)      training only: half the features zeroed
    proj ("mlp"): LN-Linear-GELU-Linear (B, 49, 192)       trainable; "linear": one Linear

`backbone_map` is the frozen backbone, `backbone_features` everything up to the flatten, `project`
the rest; `forward` also accepts the (B, 49, 1280) features themselves, as cached by
picovlm.data.features.

One inverted residual block (expansion t, input c_in, output c_out, stride s):

    Conv1x1 c_in -> t*c_in, BN, ReLU6          expand   (left out when t = 1)
    DWConv3x3/s t*c_in, BN, ReLU6              one filter per channel
    Conv1x1 t*c_in -> c_out, BN                linear bottleneck: no activation
    + input when s = 1 and c_in = c_out

The backbone is frozen because 8k captioned images are far too few to improve ImageNet
features, and it stays in eval mode so its BatchNorm statistics are ImageNet's, whatever
`model.train()` says.
"""

from __future__ import annotations

import torch
from torch import nn

from picovlm.config import VLMConfig

# (expansion t, output channels c, repeats n, stride of the first repeat s), from the paper's Table 2.
INVERTED_RESIDUAL_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS, FEATURE_CHANNELS = 32, 1280


def conv_bn_relu6(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias: BN follows), BN, ReLU6: torchvision's Conv2dNormActivation, keys .0 and .1."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        expand = [conv_bn_relu6(c_in, hidden, kernel_size=1)] if expand_ratio != 1 else []
        self.conv = nn.Sequential(
            *expand,
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, c_out, 1, bias=False),  # project back down, no ReLU (linear bottleneck)
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2() at width 1.0: same modules, same keys, same initialisation."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        layers = [conv_bn_relu6(3, STEM_CHANNELS, stride=2)]
        c_in = STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(conv_bn_relu6(c_in, FEATURE_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*layers)  # features.0 .. features.18
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(FEATURE_CHANNELS, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_classes) ImageNet logits."""
        x = self.features(images)  # (B, 1280, H/32, W/32)
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 1280)
        return self.classifier(x)


def make_projector(kind: str, c_in: int, d_out: int) -> nn.Module:
    """"linear": one Linear. "mlp": LayerNorm first, because the frozen ReLU6 features are
    non-negative and far larger than the decoder's embeddings, then Linear-GELU-Linear (LLaVA-1.5)."""
    if kind == "linear":
        return nn.Linear(c_in, d_out)
    return nn.Sequential(nn.LayerNorm(c_in), nn.Linear(c_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class MobileNetV2Encoder(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.features = MobileNetV2().features
        self.features.requires_grad_(False)
        self.pool = nn.AdaptiveAvgPool2d((cfg.cnn_grid, cfg.cnn_grid))
        self.feature_dropout = nn.Dropout(cfg.vision_dropout)  # after the cache: new draws every step
        self.proj = make_projector(cfg.vision_proj, FEATURE_CHANNELS, cfg.lm_hidden_dim)
        self.features.eval()

    def train(self, mode: bool = True) -> MobileNetV2Encoder:
        """Train the projector only; the backbone's BatchNorm keeps using (and never updates)
        its ImageNet running statistics."""
        super().train(mode)
        self.features.eval()
        return self

    @torch.no_grad()  # frozen: keep no activations for a backward pass
    def backbone_map(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, 1280, H/32, W/32) the frozen feature map,
        before pooling: what random crops of features are cut from (picovlm.data.batches)."""
        return self.features(images)

    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, grid*grid, 1280) frozen grid features.

        They depend on nothing trainable, so training without augmentation computes them once per
        image and caches them (picovlm.data.features)."""
        x = self.pool(self.backbone_map(images))  # (B, 1280, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, grid*grid, 1280)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, grid*grid, 1280) backbone features -> (B, grid*grid, D) visual tokens (trainable)."""
        return self.proj(self.feature_dropout(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, grid*grid, lm_hidden_dim) visual tokens.

        A 3-D input (B, grid*grid, 1280) is taken as cached backbone features and only projected:
        training from the feature cache goes through the same model call as from pixels."""
        if images.dim() == 3:
            return self.project(images)
        return self.project(self.backbone_features(images))

    def load_imagenet_weights(self, spec: str = "auto") -> None:
        """Overwrite the backbone with torchvision's ImageNet weights (`spec` as cfg.vision_weights).

        The whole file is loaded strictly into a full MobileNetV2, classifier included, so a file
        that is not exactly torchvision's is refused; then only `features` is kept.
        """
        from picovlm.pretrained import load_strict, read_state_dict, resolve_weights

        path = resolve_weights(spec)
        if path is None:
            return
        full = MobileNetV2()
        load_strict(full, read_state_dict(path), path)
        self.features.load_state_dict(full.features.state_dict())
