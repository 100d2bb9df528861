"""Fusion by image-token placeholders: the projected image embeddings take the places of the
image tokens in the text, so a sample can hold any number of images, anywhere in its text.

    text embeddings     (B, T, D)     the language model's embeddings of input_ids, which hold
                                      n_i * K image tokens in row i (K tokens per image)
    image embeddings    (N, K, D)     N = sum of n_i: every image of the batch, in order
                                      (row 0's images first, each row's in text order)
    result              (B, T, D)     the text embeddings, image tokens replaced in order

Rows may hold different numbers of images, including none. Prefix concatenation (the image
tokens first, the text after; picovlm.models.supravl) is the special case of one image whose
tokens come first, without the placeholders.
"""

from __future__ import annotations

import torch

from picovlm.errors import UserError


def replace_image_tokens(text_embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """(B, T, D) text embeddings with the image tokens' rows replaced by (N, K, D) image embeddings."""
    slots = input_ids == image_token_id  # (B, T)
    n_slots, n_given = int(slots.sum()), image_embeds.shape[0] * image_embeds.shape[1]
    if n_slots != n_given:
        raise UserError(f"the text holds {n_slots} image tokens but the images give {n_given} embeddings "
                        f"({image_embeds.shape[0]} images x {image_embeds.shape[1]}); was a prompt truncated "
                        f"inside its image tokens?")
    fused = text_embeds.clone()
    # Boolean indexing visits the slots row by row, left to right: the images' order in the batch.
    fused[slots] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(fused.dtype)
    return fused
