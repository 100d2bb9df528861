"""Conversations -> token ids and labels, for VLMs that read images through placeholder tokens.

The chat template is SmolLM2's (ChatML); every image becomes a run of `tokens_per_image` image
tokens at the start of the first user turn, which the model later replaces by the image's
projected embeddings (picovlm.models.fusion):

    <|im_start|>user\\n<|image|><|image|>...<|image|>What colour is the square?<|im_end|>\\n
    <|im_start|>assistant\\nred<|im_end|>\\n

Only the assistant's words and the <|im_end|> that closes them carry loss; the labels of
everything else (template, question, image tokens) are IGNORE_INDEX, so the model is never
trained to predict the user's text or the image placeholders.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from picovlm.data.batches import pad_rows
from picovlm.errors import UserError
from picovlm.models.supravl import IGNORE_INDEX

IMAGE_TOKEN = "<|image|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def segments(turns: list[dict[str, str]], n_images: int, tokens_per_image: int) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, carries_loss) pieces, in order."""
    pieces: list[tuple[str, bool]] = []
    for i, turn in enumerate(turns):
        images = IMAGE_TOKEN * (n_images * tokens_per_image) if i == 0 else ""
        pieces.append((f"{IM_START}user\n{images}{turn['user']}{IM_END}\n{IM_START}assistant\n", False))
        pieces.append((f"{turn['assistant']}{IM_END}", True))
        pieces.append(("\n", False))
    return pieces


def encode_conversation(tokenizer: Tokenizer, turns: list[dict[str, str]], n_images: int, tokens_per_image: int,
                        max_len: int) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) of one conversation, cut to max_len tokens; labels are the ids where
    the text carries loss, else IGNORE_INDEX (the model shifts them by one itself).

    None when the image tokens themselves do not fit in max_len: an example whose image is
    cut off cannot be trained on. Turns cut off at the end are simply dropped."""
    ids: list[int] = []
    labels: list[int] = []
    for text, carries_loss in segments(turns, n_images, tokens_per_image):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        labels += piece if carries_loss else [IGNORE_INDEX] * len(piece)
    if n_images * tokens_per_image and ids[:max_len].count(image_token_id(tokenizer)) < n_images * tokens_per_image:
        return None
    return ids[:max_len], labels[:max_len]


def image_token_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if token_id is None:
        raise UserError(f"the tokenizer has no {IMAGE_TOKEN} token; add it with add_image_token(tokenizer)")
    return token_id


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE over the texts, with ChatML's tokens (<|endoftext|> 0 = padding, <|im_start|> 1,
    <|im_end|> 2, as in SmolLM2) and the image token last, for a language model trained from scratch."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    add_image_token(tokenizer)
    return tokenizer


def add_image_token(tokenizer: Tokenizer) -> int:
    """Add the image placeholder as a special token (a no-op if present); returns its id. The
    language model's embedding table must then have a row for it."""
    tokenizer.add_special_tokens([IMAGE_TOKEN])
    return image_token_id(tokenizer)


@dataclass
class ChatBatch:
    input_ids: torch.Tensor  # (B, T) right-padded with pad_id
    labels: torch.Tensor  # (B, T) IGNORE_INDEX on padding and on everything but answers
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens, 0 on padding
    images: list[torch.Tensor]  # per sample (n_i, S, S, 3) uint8 (or (n_i, 3, S, S) floats); n_i may be 0

    @property
    def targets(self) -> torch.Tensor:
        """(B, T - 1): what each position is trained to predict (labels shifted by one)."""
        return self.labels[:, 1:]

    def rows(self, rows: slice) -> ChatBatch:
        """Some samples of the batch (one process's share); the padded length stays the batch's."""
        return ChatBatch(self.input_ids[rows], self.labels[rows], self.attention_mask[rows], self.images[rows])


def collate(examples: list[dict[str, Any]], pad_id: int) -> ChatBatch:
    """examples: {"input_ids", "labels", "images" (n, 3, H, W)} -> one right-padded batch.
    Samples never share a row, so no sample can attend to another (no packing)."""
    ids = [e["input_ids"] for e in examples]
    mask = pad_rows([[1] * len(row) for row in ids], 0)
    return ChatBatch(pad_rows(ids, pad_id), pad_rows([e["labels"] for e in examples], IGNORE_INDEX), mask,
                     [e["images"] for e in examples])
