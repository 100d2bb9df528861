"""Where training data comes from, ready for the loop in picovlm.train.

    prepare_data       captions: a Flickr8k-layout folder (in memory, from the uint8 image cache;
                       with a frozen MobileNetV2, from its feature cache) or a stream (shards,
                       hf:NAME); trains the caption tokenizer unless one is given
    prepare_vqa_data   Cauldron-format conversations for a NanoVLM, one source or a weighted mix

With several processes, one process builds the caches and trains the tokenizer; the others read
the caches and receive the tokenizer, so every process sees the same data and token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from picovlm.chat import IMAGE_TOKEN, train_chat_tokenizer
from picovlm.config import TrainConfig, VLMConfig
from picovlm.data.batches import CaptionBatches
from picovlm.data.features import cached_features
from picovlm.data.flickr8k import load_split
from picovlm.data.images import cached_images, default_cache_dir
from picovlm.data.shapes import ensure_shapes_dataset
from picovlm.data.stream import StreamBatches, is_stream, open_split
from picovlm.data.vqa_batches import VQABatches
from picovlm.distributed import SINGLE_PROCESS, DistInfo, broadcast_bytes, main_process_first
from picovlm.errors import UserError
from picovlm.models.mobilenet_v2 import MobileNetV2Encoder
from picovlm.models.nanovlm import NanoVLM
from picovlm.models.supravl import SupraVL
from picovlm.tokenizer import CaptionTokenizer

TOKENIZER_CAPTIONS = 200_000  # a streamed source's tokenizer learns from its first this many captions


def default_data_dir(n_images: int = 3000) -> Path:
    """The built-in shapes dataset, generated on first use."""
    return ensure_shapes_dataset(default_cache_dir() / f"shapes-v1-{n_images}", n_images=n_images)


@dataclass
class Data:
    train: CaptionBatches | StreamBatches
    dev: CaptionBatches | StreamBatches | None  # a stream may have no dev split
    tokenizer: CaptionTokenizer
    path: str


def prepare_data(data_dir: str | Path | None, cfg: VLMConfig, tokenizer: CaptionTokenizer | None,
                 dist_info: DistInfo = SINGLE_PROCESS, device: str = "cpu", num_workers: int = 0,
                 frozen_encoder: torch.nn.Module | None = None, progress: bool = True,
                 mirror_features: bool = False, feature_crop: float = 1.0) -> Data:
    """Splits, tokenizer (trained on the train captions unless given) and batches: in memory for a
    Flickr8k-layout folder (default: the built-in shapes set), streamed for shards or hf:NAME.

    With a frozen_encoder (see uses_feature_cache), in-memory batches carry its cached backbone features,
    and with mirror_features the training batches those of the mirrored images too; feature_crop < 1
    caches the training images' whole maps, for random crops of at least that share of their area.
    progress: show progress bars while the image and feature caches are built."""
    if is_stream(data_dir):
        return _prepare_stream(str(data_dir), cfg, tokenizer, dist_info, device, num_workers)
    return _prepare_in_memory(data_dir, cfg, tokenizer, dist_info, device, frozen_encoder, progress,
                              mirror_features, feature_crop)


def _shared_tokenizer(train: Callable[[], Tokenizer], dist_info: DistInfo, device: str) -> Tokenizer:
    """One process trains the tokenizer and sends it to the others, so all use the same ids."""
    trained = train() if dist_info.is_main else None
    text = broadcast_bytes(trained.to_str().encode() if trained else None, dist_info, device)
    return trained or Tokenizer.from_str(text.decode())


def _shared_caption_tokenizer(captions: Callable[[], Iterable[str]], cfg: VLMConfig, dist_info: DistInfo,
                              device: str) -> CaptionTokenizer:
    train = lambda: CaptionTokenizer.train(captions(), cfg.lm_vocab_size, cfg.lm_tokenizer).tokenizer
    return CaptionTokenizer(_shared_tokenizer(train, dist_info, device))


def _prepare_stream(source: str, cfg: VLMConfig, tokenizer: CaptionTokenizer | None, dist_info: DistInfo,
                    device: str, num_workers: int) -> Data:
    train = StreamBatches(source, "train", tokenizer, cfg, dist_info, num_workers)
    dev = StreamBatches(source, "dev", tokenizer, cfg, dist_info, num_workers) if open_split(source, "dev") else None
    if tokenizer is None:
        tokenizer = _shared_caption_tokenizer(lambda: train.captions(TOKENIZER_CAPTIONS), cfg, dist_info, device)
    for split in (train, dev):
        if split is not None:
            split.tokenizer = tokenizer
    return Data(train, dev, tokenizer, source)


def _prepare_in_memory(data_dir: str | Path | None, cfg: VLMConfig, tokenizer: CaptionTokenizer | None,
                       dist_info: DistInfo, device: str, frozen_encoder: torch.nn.Module | None,
                       progress: bool, mirror_features: bool, feature_crop: float) -> Data:
    with main_process_first(dist_info):  # one process generates/caches, the others then read
        data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        train_set, dev_set = load_split(data_dir, "train"), load_split(data_dir, "dev")
        if dist_info.enabled:
            for split in (train_set, dev_set):
                cached_images(split.image_dir, split.names, cfg.img_size, progress=progress)
    if tokenizer is None:
        tokenizer = _shared_caption_tokenizer(lambda: (c for caps in train_set.captions for c in caps), cfg,
                                              dist_info, device)
    data = Data(CaptionBatches(train_set, tokenizer, cfg, progress=progress),
                CaptionBatches(dev_set, tokenizer, cfg, progress=progress), tokenizer, str(data_dir))
    if frozen_encoder is not None:
        with main_process_first(dist_info):
            # dev batches: the whole image, never mirrored nor cropped, as generation sees it
            for split, batches, mirror, crop in ((train_set, data.train, mirror_features, feature_crop),
                                                 (dev_set, data.dev, False, 1.0)):
                features = partial(cached_features, frozen_encoder, batches.images.numpy(), split.image_dir,
                                   split.names, cfg, device=device, progress=progress, whole_map=crop < 1)
                batches.use_features(features(), features(mirrored=True) if mirror else None, crop)
    return data


def prepare_vqa_data(data_dir: str | Path | None, model: NanoVLM, dist_info: DistInfo = SINGLE_PROCESS,
                     device: str = "cpu") -> Data:
    """Cauldron-format conversations for a NanoVLM: `data_dir` is one source or several,
    "SOURCE[=WEIGHT],..." (see picovlm.data.cauldron); default: the built-in shapes VQA set. A source
    without a validation split gives 5 % of its rows. The tokenizer is the model's (its language
    model's), else one trained on the conversations."""
    from picovlm.data.cauldron import load_cauldron, mix, split_train_val, write_shapes_vqa

    with main_process_first(dist_info):
        if data_dir is None:
            data_dir = default_cache_dir() / "shapes-vqa-v1"
            if not (data_dir / "data").is_dir():
                write_shapes_vqa(data_dir)
    train_parts, dev_parts = [], []
    for item in str(data_dir).split(","):
        source, _, weight = item.partition("=")
        train = load_cauldron(source, "train")
        try:
            dev = load_cauldron(source, "validation")
        except UserError:  # no validation split
            train, dev = split_train_val(train, 0.05, seed=0)
        train_parts.append((train, float(weight or 1.0)))
        dev_parts.append((dev, 1.0))
    train_rows, dev_rows = mix(train_parts), mix(dev_parts)
    tokenizer = model.tokenizer
    if tokenizer is None:
        tokenizer = _shared_chat_tokenizer(train_rows, model, dist_info, device)
    k = model.tokens_per_image
    return Data(VQABatches(train_rows, tokenizer, model.cfg, k, "train"),
                VQABatches(dev_rows, tokenizer, model.cfg, k, "validation"), tokenizer, str(data_dir))


def _shared_chat_tokenizer(rows: Any, model: NanoVLM, dist_info: DistInfo, device: str) -> Any:
    """A byte-level BPE for the conversations with ChatML's special tokens and the image token, trained
    by one process and sent to the others; its image token becomes the model's."""
    texts = lambda: (t[key] for row in rows for t in row["texts"] for key in ("user", "assistant"))
    tokenizer = _shared_tokenizer(lambda: train_chat_tokenizer(texts(), model.cfg.lm_vocab_size), dist_info, device)
    model.cfg.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)  # at most lm_vocab_size
    return tokenizer


def uses_feature_cache(model: SupraVL, tc: TrainConfig) -> bool:
    """A frozen backbone sees the same pixels every epoch unless they are augmented: then its
    features are computed once per image (picovlm.data.features) and training runs only the rest."""
    return isinstance(model.vis_enc, MobileNetV2Encoder) and not tc.augment and tc.feature_cache
