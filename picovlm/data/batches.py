"""Training batches: cached uint8 images + pre-tokenised captions, gathered by index.

Everything an epoch needs sits in memory as arrays, so a batch is a few gathers:

    images   (N_images, S, S, 3) uint8      decoded once, from the on-disk cache
    tokens   (N_pairs, L + 1) int64         [<bos>, caption..., <eos>, <pad>...], L = lm_max_text_len
    image_of (N_pairs,)                     which image each caption describes
    image_words (N_images, V) bool          (with serve_words, for --word-loss) the tokens
                                            any of an image's captions uses

With a frozen pretrained backbone and no augmentation, `use_features` swaps the pixels for the
backbone's cached features, (N_images, grid*grid, C) float16 (picovlm.data.features), and
batches carry those instead (`Batch.is_features`). With crop_scale < 1 the cache holds the
backbone's whole map instead, (N_images, h*w, C), and every caption gets a random square crop of
it, pooled to the grid (`crop_and_pool`): the random resized crop of augmentation, on features.

One epoch visits every (image, caption) pair once, in an order drawn from a generator
seeded with (seed, epoch), so a resumed run sees exactly the batches it would have seen.
A batch is trimmed to its longest caption, and normalised to float on the device.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from picovlm.config import TrainConfig, VLMConfig
from picovlm.data.flickr8k import CaptionSet
from picovlm.data.images import cached_images
from picovlm.models.supravl import IGNORE_INDEX
from picovlm.tokenizer import CaptionTokenizer

_LEFT_RIGHT = ("left", "right")


@dataclass
class Batch:
    images: torch.Tensor  # (B, S, S, 3) uint8
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX on padding
    flippable: torch.Tensor  # (B,) bool: the caption says nothing about left or right
    is_features: bool = False  # images holds (B, grid*grid, C) float16 backbone features instead
    words: torch.Tensor | None = None  # (B, V) bool: the tokens any caption of the row's image uses

    def rows(self, rows: slice) -> Batch:
        """Some rows of the batch (one process's share); the padded length stays the batch's."""
        return Batch(self.images[rows], self.input_ids[rows], self.targets[rows], self.flippable[rows],
                     self.is_features, None if self.words is None else self.words[rows])


class CaptionBatches:
    def __init__(self, data: CaptionSet, tokenizer: CaptionTokenizer, cfg: VLMConfig,
                 cache_dir: Path | None = None, progress: bool = True):
        images, ok = cached_images(data.image_dir, data.names, cfg.img_size, cache_dir, progress)
        self.images = torch.from_numpy(np.array(images))  # (N, S, S, 3) uint8, copied into RAM
        self.references = data.captions
        self.names = data.names
        max_tokens = cfg.lm_max_text_len + 1  # inputs are tokens[:-1], targets tokens[1:]
        rows, image_of, flippable, truncated = [], [], [], 0
        for i, caps in enumerate(data.captions):
            if not ok[i]:
                continue
            for cap in caps:
                ids = tokenizer.encode(cap)
                truncated += len(ids) > max_tokens
                rows.append(ids[:max_tokens])
                image_of.append(i)
                flippable.append(is_flippable(cap))
        if truncated:
            warnings.warn(f"{truncated} caption(s) longer than {cfg.lm_max_text_len} tokens were truncated",
                          stacklevel=2)
        if not rows:
            raise ValueError("no readable (image, caption) pairs")
        self.tokens = pad_rows(rows, tokenizer.pad_id, max_tokens)
        self.lengths = torch.tensor([len(ids) for ids in rows])
        self.image_of = torch.tensor(image_of)
        self.flippable = torch.tensor(flippable)
        self.ok = torch.from_numpy(ok)
        self.vocab_size, self.special_ids = cfg.lm_vocab_size, tokenizer.special_ids
        self.image_words: torch.Tensor | None = None  # see serve_words
        self.n_truncated = truncated
        self.is_features = False
        self.mirrored: torch.Tensor | None = None  # (N_images, P, C) features of the mirrored images
        self.grid = cfg.cnn_grid
        self.crop_scale = 1.0  # < 1: the features are whole maps, cropped at random and pooled to the grid

    def use_features(self, features: np.ndarray, mirrored: np.ndarray | None = None,
                     crop_scale: float = 1.0) -> None:
        """Serve (N_images, P, C) cached backbone features in place of the pixels from now on. With
        the features of the mirrored images too, a shuffled epoch serves those for a random half of
        the flippable captions (see is_flippable). crop_scale < 1: the features are the backbone's
        whole (N_images, h*w, C) maps, and a shuffled epoch gives each caption a random square crop
        of at least that share of the map's area, pooled to the grid (unshuffled: the whole map)."""
        for array in (a for a in (features, mirrored) if a is not None):
            if len(array) != len(self.images):
                raise ValueError(f"{len(array)} feature rows for {len(self.images)} images")
        self.images = torch.from_numpy(np.array(features))  # copied into RAM, like the pixels
        self.mirrored = torch.from_numpy(np.array(mirrored)) if mirrored is not None else None
        self.is_features = True
        self.crop_scale = crop_scale

    def serve_words(self) -> None:
        """From now on every batch also carries, for each row, the tokens of all its image's captions
        (Batch.words), the targets of --word-loss. A mirrored image keeps its words: a left or right
        from another of its captions can stay in the bag."""
        self.image_words = words_of_images(self.tokens, self.image_of, len(self.images), self.vocab_size,
                                           self.special_ids)

    def __len__(self) -> int:
        """Number of (image, caption) pairs."""
        return len(self.tokens)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def epoch(self, batch_size: int, seed: int | None, start_batch: int = 0) -> Iterator[Batch]:
        """Batches of one epoch; shuffled by `seed` (None: in order, never mirrored nor cropped).
        Skips the first start_batch; the seed alone decides order, mirroring and crops, so a resumed
        epoch is the same."""
        mirror = crops = None
        if seed is None:
            order = torch.arange(len(self))
        else:
            rng = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(self), generator=rng)
            if self.mirrored is not None:
                mirror = (torch.rand(len(self), generator=rng) < 0.5) & self.flippable  # (N_pairs,) bool
            if self.crop_scale < 1:
                crops = torch.rand(len(self), 3, generator=rng)  # (N_pairs, 3): scale, top, left
        for b in range(start_batch, self.n_batches(batch_size)):
            pair_idx = order[b * batch_size:(b + 1) * batch_size]
            yield self.batch(pair_idx, mirror[pair_idx] if mirror is not None else None,
                             crops[pair_idx] if crops is not None else None)

    def batch(self, pair_idx: torch.Tensor, mirror: torch.Tensor | None = None,
              crops: torch.Tensor | None = None) -> Batch:
        """The pairs pair_idx; where mirror (len(pair_idx),) is True, the mirrored image's features;
        with whole maps, the crops (len(pair_idx), 3) of them (None: the whole map), pooled."""
        t = int(self.lengths[pair_idx].max())
        input_ids, targets = shift_targets(self.tokens[pair_idx, :t])
        image_idx = self.image_of[pair_idx]
        images = self.images[image_idx]  # a copy: indexing with a tensor gathers
        if mirror is not None and self.mirrored is not None:
            images[mirror] = self.mirrored[image_idx[mirror]]
        if self.crop_scale < 1:
            images = crop_and_pool(images, self.grid, self.crop_scale, crops)
        words = self.image_words[image_idx] if self.image_words is not None else None
        return Batch(images, input_ids, targets, self.flippable[pair_idx], self.is_features, words)

    def describe(self) -> str:
        return f"{len(self)} captions"


def crop_and_pool(maps: torch.Tensor, grid: int, min_scale: float, draws: torch.Tensor | None) -> torch.Tensor:
    """(B, h*w, C) square feature maps -> (B, grid*grid, C): of each map a square crop, then
    adaptive average pooling to grid x grid, as the encoder pools the whole map.

    draws (B, 3) uniform in [0, 1) place the crops: its area share, min_scale to 1, rounded to
    whole cells, and its top and left cell. None: every crop is the whole map, the features of
    the uncropped image. The cells of the crop come out unchanged when its side is the grid.

    Average pooling over a window is linear and separable, so each map's crop-and-pool is one
    product rows @ map @ cols^T, with rows and cols (grid, side) holding the pooling weights at
    the crop's rows and columns: two batched matrix products instead of a pooling call per map."""
    B, P, C = maps.shape
    side = math.isqrt(P)
    if draws is None:  # every map whole: one set of weights serves all
        rows = cols = _pool_weights(side, grid).expand(B, grid, side)
    else:
        rows, cols = torch.zeros(B, grid, side), torch.zeros(B, grid, side)
        for i, (u_scale, u_top, u_left) in enumerate(draws.tolist()):
            crop = max(1, round(side * math.sqrt(min_scale + (1 - min_scale) * u_scale)))  # cells per side
            top, left = int((side - crop + 1) * u_top), int((side - crop + 1) * u_left)
            rows[i, :, top:top + crop] = cols[i, :, left:left + crop] = _pool_weights(crop, grid)
    x = maps.view(B, side, side * C).float()  # (B, side, side*C): rows of cells
    pooled_rows = torch.bmm(rows, x).view(B, grid, side, C)  # (B, grid, side, C)
    pooled = cols[:, None] @ pooled_rows  # (B, 1, grid, side) @ (B, grid, side, C) -> (B, grid, grid, C)
    return pooled.reshape(B, grid * grid, C).to(maps.dtype)


@functools.cache
def _pool_weights(n: int, grid: int) -> torch.Tensor:
    """(grid, n): row g averages the cells adaptive average pooling from n to grid puts in window g."""
    return F.adaptive_avg_pool1d(torch.eye(n)[None], grid)[0].T


def words_of_images(tokens: torch.Tensor, image_of: torch.Tensor, n_images: int, vocab_size: int,
                    special_ids: list[int]) -> torch.Tensor:
    """(N_pairs, L) padded caption tokens -> (n_images, vocab_size) bool: which tokens the captions of
    each image use, the special ones (<pad>, <bos>, <eos>, <unk>) left out."""
    words = torch.zeros(n_images, vocab_size, dtype=torch.bool)
    words[image_of[:, None].expand_as(tokens), tokens] = True
    words[:, special_ids] = False
    return words


def pad_rows(rows: list[list[int]], value: int, length: int | None = None) -> torch.Tensor:
    """Token lists -> (len(rows), length or the longest) int64, right-padded with `value`."""
    out = torch.full((len(rows), length or max(map(len, rows))), value, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def is_flippable(caption: str) -> bool:
    """A mirrored image still fits the caption unless the caption says left or right."""
    return not any(w in caption.lower() for w in _LEFT_RIGHT)


def shift_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, t) padded [<bos>, ..., <eos>, <pad>...] -> input_ids tokens[:, :-1] and targets tokens[:, 1:],
    with IGNORE_INDEX where the target is padding."""
    targets = tokens[:, 1:].clone()
    targets[targets == 0] = IGNORE_INDEX  # <pad> is id 0 and never a real target
    return tokens[:, :-1], targets


AUGMENT_DRAWS = 6  # uniform random numbers augment() uses per image


def augment(images: torch.Tensor, flippable: torch.Tensor, rand: torch.Tensor,
            min_scale: float = TrainConfig.augment_scale) -> torch.Tensor:
    """Random resized crop (a square covering min_scale to all of the area), colour jitter (+-20%), and a
    horizontal flip only where the caption has no left/right words. (B, 3, S, S) float in, same shape out.

    rand (B, AUGMENT_DRAWS) holds the uniform draws; the caller makes them, so that with several
    processes each one can take its rows of the draws for the whole batch."""
    B, _, S, _ = images.shape
    out = torch.empty_like(images)
    for i in range(B):
        scale = min_scale + (1 - min_scale) * rand[i, 0].item()
        side = max(8, int(S * scale**0.5))
        top = int((S - side) * rand[i, 1].item())
        left = int((S - side) * rand[i, 2].item())
        crop = images[i:i + 1, :, top:top + side, left:left + side]
        out[i] = F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False)[0]
        if flippable[i] and rand[i, 3] < 0.5:
            out[i] = out[i].flip(-1)
    brightness = 0.8 + 0.4 * rand[:, 4].view(B, 1, 1, 1)
    contrast = 0.8 + 0.4 * rand[:, 5].view(B, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * contrast + mean * brightness
