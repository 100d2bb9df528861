"""Model components, one file each: vision_cnn (pixels -> visual tokens, trained from scratch),
mobilenet_v2 (pixels -> visual tokens through a frozen ImageNet MobileNetV2), vit (pixels -> patch
embeddings, SigLIP's vision tower), projector (patch embeddings -> visual tokens: pixel shuffle +
Linear), gpt2 (decoder blocks), llama (a Llama-style decoder that loads SmolLM2; weights via
picovlm.pretrained_lm), supravl (CNN/MobileNetV2 + GPT-2 by prefix concatenation), fusion and
nanovlm (ViT + projector + Llama by image-token placeholders)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from picovlm.config import VLMConfig
    from picovlm.models.nanovlm import NanoVLM
    from picovlm.models.supravl import SupraVL


def build_model(cfg: VLMConfig) -> SupraVL | NanoVLM:
    """The model class a config describes (cfg.family), freshly initialised."""
    cfg.validate()
    if cfg.family == "nanovlm":
        from picovlm.models.nanovlm import NanoVLM

        return NanoVLM(cfg)
    from picovlm.models.supravl import SupraVL

    return SupraVL(cfg)
