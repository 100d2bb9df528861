"""Where does the decoder look? Per-word attention over the visual tokens, drawn on the image.

For a caption w_1 .. w_n of an image, the text position that predicts token t attends over
the sequence [16 visual tokens, <bos>, w_1, ...]. Its attention weights on the 16 visual tokens,
reshaped to the 4x4 grid the CNN pooled to, say which image regions fed that prediction.

    visual tokens (P = grid * grid) + text (T)   one forward pass, recording attention
    attention per layer                          (1, H, P + T, P + T)
    rows of the predicting positions, columns :P (n_tokens, L, H, P)
    tokens grouped into words, averaged          (n_words, L, H, grid, grid)

The weights are the real ones: `record_attention` makes each attention layer compute its
softmax explicitly and use it for its output (the logits are unchanged; tests check both).
A word's map sums to the attention mass on the image, which is less than one: the rest goes
to the text so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from picovlm.generate import ImageLike, generate, preprocess, resolve_generation
from picovlm.models.supravl import SupraVL


@dataclass
class Explanation:
    caption: str
    words: list[str]
    maps: torch.Tensor  # (n_words, L, H, grid, grid) attention on each visual token
    image: Image.Image  # what the model saw, resized to img_size

    @property
    def mean_maps(self) -> torch.Tensor:
        """(n_words, grid, grid): averaged over layers and heads."""
        return self.maps.mean(dim=(1, 2))


def upsample(grid: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(grid, grid) attention -> (height, width), bilinear, for drawing over the image."""
    return torch.nn.functional.interpolate(grid[None, None].float(), size=(height, width), mode="bilinear",
                                           align_corners=False)[0, 0]


def attention_over_image(model: SupraVL, pixels: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Attention of each position predicting token_ids[j] on the visual tokens: (n, L, H, P)."""
    P, bos = model.cfg.n_vis_tokens, model.cfg.bos_token_id
    layers = [block.attn for block in model.blocks]
    if not token_ids:
        return torch.zeros(0, len(layers), model.cfg.lm_n_heads, P)
    for attn in layers:
        attn.record_attention = True
    try:
        with torch.inference_mode():
            inputs = torch.tensor([[bos, *token_ids[:-1]]], device=pixels.device)
            model.hidden_states(inputs, model.encode_images(pixels))
        # Text position j (row P + j) is the one whose output predicts token_ids[j].
        rows = [attn.attention[0, :, P:P + len(token_ids), :P] for attn in layers]  # each (H, n, P)
        return torch.stack(rows).permute(2, 0, 1, 3).float()  # (n, L, H, P)
    finally:
        for attn in layers:
            attn.record_attention, attn.attention = False, None


def _group_words(model: SupraVL, token_ids: list[int]) -> list[list[int]]:
    """Indices of the tokens of each word: byte-level BPE marks a word start with 'Ġ' (a space)."""
    groups: list[list[int]] = []
    for j, tok in enumerate(token_ids):
        piece = model.tokenizer.tokenizer.id_to_token(tok) or ""
        if not groups or piece.startswith("Ġ"):
            groups.append([])
        groups[-1].append(j)
    return groups


def explain(model: SupraVL, image: ImageLike, strategy: str = "greedy", **generation: object) -> Explanation:
    """Caption one image and return the attention map of every word of the caption."""
    pixels = preprocess([image], model)
    token_ids = generate(model, pixels, resolve_generation(model, strategy, **generation))[0]
    attention = attention_over_image(model, pixels, token_ids)  # (n_tokens, L, H, P)
    groups = _group_words(model, token_ids)
    words = [model.tokenizer.decode([token_ids[j] for j in g]) for g in groups]
    grid = model.cfg.cnn_grid
    maps = torch.stack([attention[g].mean(dim=0) for g in groups]) if groups else attention
    maps = maps.reshape(len(groups), *attention.shape[1:3], grid, grid)
    # Show the pixels the model saw: undo the normalisation of the preprocessed tensor.
    mean = torch.tensor(model.cfg.img_mean).view(3, 1, 1)
    std = torch.tensor(model.cfg.img_std).view(3, 1, 1)
    seen = ((pixels[0].cpu() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Explanation(model.tokenizer.decode(token_ids), words, maps, Image.fromarray(seen))


def draw_explanation(expl: Explanation, out: str | Path, per_layer: bool = False) -> Path:
    """A strip of heat maps, one per word (mean over layers and heads; one row per layer too if asked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_words, n_layers = len(expl.words), expl.maps.shape[1]
    rows = [("all layers", expl.mean_maps)]
    if per_layer:
        rows += [(f"layer {i + 1}", expl.maps[:, i].mean(dim=1)) for i in range(n_layers)]
    size = expl.image.size[0]
    fig, axes = plt.subplots(len(rows), max(n_words, 1), figsize=(1.9 * max(n_words, 1), 2.1 * len(rows)),
                             squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for w in range(max(n_words, 1)):
            ax = axes[r, w]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(np.asarray(expl.image))
            if n_words:
                heat = upsample(maps[w], size, size)
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
                ax.set_xlabel(expl.words[w], fontsize=11)
            if w == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(expl.caption, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
