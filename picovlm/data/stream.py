"""Streamed training data: WebDataset tar shards and Hugging Face datasets, never whole in memory.

`picovlm train --data SOURCE` streams when SOURCE is

    a folder of .tar shards   WebDataset layout, as img2dataset writes for CC3M/LAION-scale sets:
                              each sample is KEY.jpg (or .png/.webp) + KEY.txt (the caption),
                              other members (KEY.json, ...) are ignored. Shards in SOURCE/train/
                              and SOURCE/dev/ if those exist, else every SOURCE/*.tar is train.
    hf:NAME                   anything `datasets.load_dataset(NAME, streaming=True)` opens: a Hub
                              dataset id, or a local folder of parquet/arrow/tar files. Splits
                              "train" and ("validation" or "dev"); an image column (jpg, png,
                              webp or image) and a caption column (txt, caption, text; a list
                              of captions gives one of them per epoch).

Hugging Face `datasets` does the reading (its "webdataset" builder for tar shards). Each
torchrun process gets its own shards (`split_dataset_by_node`), and a process's DataLoader
workers split those shards again, so every sample is read once per epoch by one worker. The
order is a shuffle buffer, reseeded each epoch. Images are decoded, resized and tokenised in
the workers; an unreadable image is skipped with a warning.

A stream has no length: training needs --max-steps, an epoch ends when any process's shards
run out, and --resume skips (reads without training) the batches of the epoch already done.
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from picovlm.config import VLMConfig
from picovlm.data.batches import Batch, is_flippable, pad_rows, shift_targets
from picovlm.data.images import decode_image, load_image, resize_square, to_rgb
from picovlm.distributed import SINGLE_PROCESS, DistInfo
from picovlm.errors import UserError, first_line
from picovlm.tokenizer import CaptionTokenizer

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
CAPTION_COLUMNS = ("txt", "caption", "text", "captions")
DEV_SPLITS = ("validation", "dev")


def is_stream(data: str | Path | None) -> bool:
    """True for hf:NAME and for a folder holding .tar shards (itself or in train/)."""
    if data is None:
        return False
    if str(data).startswith("hf:"):
        return True
    folder = Path(data)
    return folder.is_dir() and (any(folder.glob("*.tar")) or any(folder.glob("train/*.tar")))


def open_split(source: str, split: str) -> Any | None:
    """The "train" or "dev" split of a source as a streaming `datasets.IterableDataset`;
    None when the source has no such split (a source must have train)."""
    datasets = import_datasets()

    if source.startswith("hf:"):
        names = ["train"] if split == "train" else list(DEV_SPLITS)
        for name in names:
            try:
                return datasets.load_dataset(source[3:], split=name, streaming=True)
            except ValueError as e:
                if "split" not in str(e).lower():  # an unknown split name: try the next one
                    raise UserError(f"cannot stream {source}: {first_line(e)}") from None
            except Exception as e:  # missing repo, no network, unreadable files: one line
                raise UserError(f"cannot stream {source}: {first_line(e)}; check the name or path") from None
        if split == "train":
            raise UserError(f"{source} has no 'train' split")
        return None
    folder = Path(source)
    sub = folder / ("train" if split == "train" else "dev")
    files = sorted(sub.glob("*.tar")) if sub.is_dir() else (sorted(folder.glob("*.tar")) if split == "train" else [])
    if not files:
        if split == "train":
            raise UserError(f"no .tar shards in {folder} or {folder / 'train'}")
        return None
    return datasets.load_dataset("webdataset", data_files={"train": [str(f) for f in files]}, split="train",
                                 streaming=True)


def import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise UserError("streaming needs Hugging Face datasets: pip install 'picovlm[stream]'") from None
    return datasets


def _find_column(columns: list[str], wanted: tuple[str, ...], what: str, source: str) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise UserError(f"{source} has no {what} column (looked for {', '.join(wanted)}; it has {', '.join(columns)})")


class StreamBatches:
    """Batches read from a stream, this process's share only. Same Batch as CaptionBatches."""

    def __init__(self, source: str, split: str, tokenizer: CaptionTokenizer | None, cfg: VLMConfig,
                 dist_info: DistInfo = SINGLE_PROCESS, num_workers: int = 0, shuffle_buffer: int = 2000):
        datasets = import_datasets()
        dataset = open_split(source, split)
        if dataset is None:
            raise UserError(f"{source} has no {split} split")
        columns = list(dataset.features or {}) if dataset.features else _peek_columns(dataset)
        self.image_column = _find_column(columns, IMAGE_COLUMNS, "image", source)
        self.caption_column = _find_column(columns, CAPTION_COLUMNS, "caption", source)
        if isinstance((dataset.features or {}).get(self.image_column), datasets.Image):
            # Bytes, not PIL images: picovlm decodes them itself and skips a broken one.
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([self.image_column, self.caption_column])
        self.source, self.tokenizer, self.cfg = source, tokenizer, cfg
        self.dist_info, self.num_workers, self.shuffle_buffer = dist_info, num_workers, shuffle_buffer
        self._caption_rng = random.Random(0)

    def describe(self) -> str:
        return f"streamed from {self.source}"

    def n_batches(self, batch_size: int) -> None:
        return None  # unknown until the stream ends

    def epoch(self, batch_size: int, seed: int | None, start_batch: int = 0) -> Iterator[Batch]:
        """This process's batches of one pass over the stream (shuffled by `seed`; None: in order).
        batch_size is per process here."""
        from datasets.distributed import split_dataset_by_node
        from torch.utils.data import DataLoader

        dataset = self.dataset
        if seed is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        dataset = split_dataset_by_node(dataset, rank=self.dist_info.rank, world_size=self.dist_info.world_size)
        self._caption_rng = random.Random(seed or 0)  # which caption of a list, per epoch
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                            collate_fn=self.collate)
        return itertools.islice(loader, start_batch, None)

    def captions(self, limit: int) -> Iterator[str]:
        """Up to `limit` captions from the start of the stream (to train a tokenizer)."""
        for row in itertools.islice(self.dataset.select_columns([self.caption_column]), limit):
            yield from _as_list(row[self.caption_column])

    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        """Rows of the stream -> Batch: images (B, S, S, 3) uint8, tokens shifted into inputs and targets."""
        assert self.tokenizer is not None, "set .tokenizer before reading batches"
        images, token_rows, flippable = [], [], []
        max_tokens = self.cfg.lm_max_text_len + 1
        for row in rows:
            try:
                image = self._image(row[self.image_column])
            except UserError as e:
                warnings.warn(f"skipped a sample of {self.source}: {e}", stacklevel=2)
                continue
            caption = self._caption_rng.choice(_as_list(row[self.caption_column]))
            images.append(torch.tensor(resize_square(image, self.cfg.img_size)))
            token_rows.append(self.tokenizer.encode(caption)[:max_tokens])
            flippable.append(is_flippable(caption))
        if not images:
            raise UserError(f"a batch of {len(rows)} samples from {self.source} has no readable image")
        input_ids, targets = shift_targets(pad_rows(token_rows, self.tokenizer.pad_id))
        return Batch(torch.stack(images), input_ids, targets, torch.tensor(flippable))

    @staticmethod
    def _image(value: Any) -> Image.Image:
        """An image cell as 8-bit RGB: encoded bytes, {"bytes", "path"}, a PIL image or a path."""
        if isinstance(value, Image.Image):
            return to_rgb(value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return decode_image(value["bytes"], value.get("path") or "stream sample")
            if value.get("path"):
                return load_image(value["path"])
        if isinstance(value, (bytes, bytearray)):
            return decode_image(bytes(value), "stream sample")
        if isinstance(value, str):
            return load_image(value)
        raise UserError(f"unsupported image cell of type {type(value).__name__}")


def _as_list(caption: Any) -> list[str]:
    captions = [caption] if isinstance(caption, str) else [c for c in caption if isinstance(c, str)]
    return captions or [""]


def _peek_columns(dataset: Any) -> list[str]:
    """Column names of a stream whose features are not declared: read its first row."""
    first = next(iter(dataset), None)
    return list(first) if first is not None else []
