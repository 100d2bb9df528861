"""Training batches for the placeholder-token family (NanoVLM): Cauldron conversations in memory.

Each row becomes one example, decoded and tokenised once:

    images     (n_i, S, S, 3) uint8      the row's images resized to S = vit_img_size
    input_ids  [T_i] ints                ChatML turns, n_i * K image tokens in the first user turn
    labels     [T_i] ints                the ids where the assistant speaks, else IGNORE_INDEX

An epoch visits every example once in an order drawn from (seed, epoch), like CaptionBatches,
so a resumed run sees the same batches. A batch is right-padded to its longest example; samples
never share a row (no packing), so none can attend to another.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from tokenizers import Tokenizer

from picovlm.chat import ChatBatch, collate, encode_conversation
from picovlm.config import VLMConfig
from picovlm.data.images import resize_square, to_rgb


class VQABatches:
    def __init__(self, rows: Iterable[dict[str, Any]], tokenizer: Tokenizer, cfg: VLMConfig, tokens_per_image: int,
                 name: str = "vqa"):
        self.examples: list[dict[str, Any]] = []
        self.name, self.pad_id = name, cfg.pad_token_id
        dropped = 0
        for row in rows:
            images = [torch.from_numpy(resize_square(to_rgb(im), cfg.vit_img_size).copy()) for im in row["images"]]
            encoded = encode_conversation(tokenizer, row["texts"], len(images), tokens_per_image, cfg.lm_max_text_len)
            if encoded is None:
                dropped += 1
                continue
            stacked = torch.stack(images) if images else torch.zeros(0, cfg.vit_img_size, cfg.vit_img_size, 3,
                                                                     dtype=torch.uint8)
            self.examples.append({"input_ids": encoded[0], "labels": encoded[1], "images": stacked})
        if dropped:
            warnings.warn(f"{dropped} example(s) of {name} dropped: their image tokens do not fit in "
                          f"lm_max_text_len={cfg.lm_max_text_len}", stacklevel=2)
        if not self.examples:
            raise ValueError(f"no usable examples in {name}")

    def __len__(self) -> int:
        return len(self.examples)

    def n_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)

    def describe(self) -> str:
        return f"{len(self)} conversations"

    def epoch(self, batch_size: int, seed: int | None, start_batch: int = 0) -> Iterator[ChatBatch]:
        """Batches of one epoch; shuffled by `seed` (None: in order). Skips the first start_batch."""
        order = torch.arange(len(self)) if seed is None else \
            torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        for b in range(start_batch, self.n_batches(batch_size)):
            picked = order[b * batch_size:(b + 1) * batch_size].tolist()
            yield collate([self.examples[i] for i in picked], self.pad_id)
