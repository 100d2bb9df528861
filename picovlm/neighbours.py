"""Caption neighbours: the training captions of the images a captioner sees as most alike.

A captioner trained from scratch on a few thousand images writes better than it sees: its beams
are fluent, agree with each other (so a vote among them, mbr, changes little) and often fit the
picture loosely. The training set can vote instead. Images that the model's own encoder places
close to a new one were often described in the words the new one's references use, so
`--mbr-neighbours K` keeps, of an image's W beams, the one that would score best as a caption of
its K nearest training images: the highest BLEU-4 against each neighbour's captions as
references, averaged over the K (consensus reranking, Devlin et al. 2015, "Exploring Nearest
Neighbor Approaches for Image Captioning"). The model still writes every caption; the training
captions only choose among its beams.

The index is data the checkpoint carries, not parameters: for each training image, the unit-length
mean of its visual tokens, and its captions as token ids. It sits beside the weights as
neighbours.safetensors:

    features  (N, D)  float32  each training image's mean visual token, unit length
    tokens    (T,)    int32    the M training captions' token ids (no <bos>/<eos>), one after another
    lengths   (M,)    int32    how many of `tokens` each caption takes, in order
    image_of  (M,)    int32    the row of `features` each caption describes

Features stay float32: in float16 the order of neighbours whose similarities differ in the fourth
digit changes, which cost a checkpoint 0.24 BLEU-4 (docs/ablations.md, sixteenth round).

The features come from one set of weights, so the file records a fingerprint of the weights file
it was built with, and loading refuses an index beside other weights (last/'s in best/, say)
rather than rank by features the model would not compute.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from picovlm.data.flickr8k import load_split
from picovlm.data.images import cached_images, normalize
from picovlm.errors import UserError
from picovlm.io import atomic_write, find_complete_dir
from picovlm.models.supravl import SupraVL

INDEX_FILE = "neighbours.safetensors"


def weights_fingerprint(weights_file: Path) -> str:
    """sha256 of a weights file (16 hex digits): which weights an index was built with."""
    return hashlib.sha256(Path(weights_file).read_bytes()).hexdigest()[:16]


def rebuild_hint(folder: str | Path) -> str:
    """What to do about a checkpoint folder's broken or stale index (the end of its error message)."""
    return f"rebuild it with 'picovlm index --model {folder} --data PATH', or delete it"


def image_features(visual: torch.Tensor) -> torch.Tensor:
    """visual tokens (B, P, D) -> (B, D): their mean, unit length (cosine similarity by dot product)."""
    return F.normalize(visual.float().mean(dim=1), dim=-1)


@dataclass
class CaptionIndex:
    features: torch.Tensor  # (N, D) float32, unit length
    tokens: torch.Tensor  # (T,) int32, the captions one after another
    lengths: torch.Tensor  # (M,) int32
    image_of: torch.Tensor  # (M,) int32
    fingerprint: str  # weights_fingerprint() of the weights file that computed `features`

    def __post_init__(self) -> None:
        self._captions_of: list[list[list[int]]] = [[] for _ in range(len(self.features))]
        captions = self.tokens.split(self.lengths.tolist())
        for caption, image in zip(captions, self.image_of.tolist()):
            self._captions_of[image].append(caption.tolist())

    def nearest_captions(self, features: torch.Tensor, k: int) -> list[list[list[list[int]]]]:
        """features (B, D) unit length -> for each row, its k nearest images' captions, one list per image."""
        similarity = features.float() @ self.features.float().T  # (B, N): cosine similarity
        nearest = similarity.topk(min(k, similarity.shape[1]), dim=-1).indices.tolist()  # (B, k), nearest first
        return [[self._captions_of[image] for image in row] for row in nearest]

    def to_bytes(self) -> bytes:
        """The index as a safetensors file's bytes."""
        return save({"features": self.features, "tokens": self.tokens, "lengths": self.lengths,
                     "image_of": self.image_of}, metadata={"fingerprint": self.fingerprint})

    @classmethod
    def load(cls, path: str | Path) -> CaptionIndex:
        """Read and check an index file; anything malformed is a UserError naming the file."""
        fix = rebuild_hint(Path(path).parent)
        try:
            with safe_open(str(path), "pt") as f:  # tensors and metadata from one opening of the file
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
                fingerprint = (f.metadata() or {}).get("fingerprint", "")
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable caption index ({e}); {fix}") from None
        parts = [tensors.get(name) for name in ("features", "tokens", "lengths", "image_of")]
        if any(part is None for part in parts) or not fingerprint or not _consistent(*parts):
            raise UserError(f"{path} does not hold a caption index (features, tokens, lengths, image_of and "
                            f"the weights' fingerprint); {fix}")
        return cls(*parts, fingerprint)


def _consistent(features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, image_of: torch.Tensor) -> bool:
    """Whether the four tensors of an index file fit together (shapes, lengths, image rows)."""
    if features.ndim != 2 or len(features) == 0 or tokens.ndim != 1 or lengths.ndim != 1 or image_of.ndim != 1:
        return False
    if len(lengths) != len(image_of) or (len(lengths) and int(lengths.min()) < 0) or int(lengths.sum()) != len(tokens):
        return False
    return not len(image_of) or 0 <= int(image_of.min()) <= int(image_of.max()) < len(features)


def add_index(model_dir: str | Path, data_dir: str | Path, split: str = "train") -> Path:
    """Build the index of a captioner checkpoint folder's model over a dataset split and write it
    into the folder (atomically) as neighbours.safetensors; returns its path. `picovlm index`."""
    from picovlm.checkpoint import WEIGHTS, from_pretrained  # (checkpoint loads indexes: imports this module)

    folder = find_complete_dir(model_dir)
    if not folder.is_dir():
        raise UserError(f"model folder not found: {model_dir}; pass a folder written by 'picovlm train'")
    model = from_pretrained(folder, read_neighbours=False)  # the index it may have is what gets replaced
    if not isinstance(model, SupraVL):
        raise UserError(f"{folder} holds a NanoVLM; a caption index is for captioners (SupraVL checkpoints)")
    index = build_index(model, data_dir, split, fingerprint=weights_fingerprint(folder / WEIGHTS))
    with atomic_write(folder / INDEX_FILE) as f:
        f.write(index.to_bytes())
    return folder / INDEX_FILE


@torch.inference_mode()
def build_index(model: SupraVL, data_dir: str | Path, split: str = "train", fingerprint: str = "",
                batch_size: int = 256, cache_dir: Path | None = None) -> CaptionIndex:
    """Encode every image of a split with the model and keep its captions: the index its
    `--mbr-neighbours` decoding reads. `fingerprint`: weights_fingerprint() of the file the model's
    weights came from (add_index passes it)."""
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer attached; load it with picovlm.load")
    model.eval()
    data = load_split(data_dir, split)
    pixels_u8, readable = cached_images(data.image_dir, data.names, model.cfg.img_size, cache_dir)  # (N, S, S, 3)
    kept = np.flatnonzero(readable)  # unreadable files were skipped with a warning
    device = next(model.parameters()).device
    features = []
    for start in range(0, len(kept), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(pixels_u8[kept[start:start + batch_size]]))
        pixels = normalize(batch, model.cfg.img_mean, model.cfg.img_std).to(device)
        features.append(image_features(model.encode_images(pixels)).cpu())
    rows = [(image, model.tokenizer.encode(caption)[1:-1]) for image, i in enumerate(kept)
            for caption in data.captions[i]]
    tokens = torch.tensor([t for _, ids in rows for t in ids], dtype=torch.int32)
    lengths = torch.tensor([len(ids) for _, ids in rows], dtype=torch.int32)
    image_of = torch.tensor([image for image, _ in rows], dtype=torch.int32)
    return CaptionIndex(torch.cat(features), tokens, lengths, image_of, fingerprint)
