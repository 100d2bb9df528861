"""An on-disk cache of a frozen backbone's features, so training runs the backbone once per image.

A frozen MobileNetV2 costs ~69 ms per 224 px image on one CPU core, and without augmentation its
output for an image never changes; an epoch of Flickr8k shows each image five times (once per
caption). `cached_features` runs the backbone once over every image of a split and stores

    <cache>/features-<key>.npy    (N, grid*grid, C) float16   C = 1280 for MobileNetV2
                                  (N, h*w, C) with whole_map: the map before pooling, h = w = S/32
    <cache>/features-<key>.json   where it came from: source images, their fingerprint, backbone hash

float16 because the features are ReLU6 outputs averaged over cells, in [0, 6], where float16's
relative error (~5e-4) is far below what bf16 autocast does to them in training anyway; it halves
the file (Flickr8k's train split at 7x7: 750 MB).

The key covers everything the features depend on: the image folder, size, mean/std, the grid, and
a hash of the backbone's weights and buffers; the JSON's fingerprint of the image files (names,
sizes, modification times) decides, as for the image cache, whether an existing file is stale.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from picovlm.config import VLMConfig
from picovlm.data.images import default_cache_dir, files_fingerprint, normalize, read_or_build_cache


def backbone_hash(backbone: torch.nn.Module) -> str:
    """SHA-1 of a module's state dict (names, dtypes, shapes and bytes): the weights' identity."""
    h = hashlib.sha1()
    for name, t in backbone.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_features(encoder: torch.nn.Module, images: np.ndarray, root: Path, names: list[str], cfg: VLMConfig,
                    cache_dir: Path | None = None, batch_size: int = 32, device: str = "cpu",
                    progress: bool = True, mirrored: bool = False, whole_map: bool = False) -> np.ndarray:
    """`encoder.backbone_features` of every image, (N, grid*grid, C) float16, cached on disk.

    images (N, S, S, 3) uint8 are the cached pixels of `root/name` for each name (unreadable ones
    are zeros; their features are never used). Computed in float32 without autocast: the features
    generation sees when it runs the backbone itself. mirrored: of the images flipped left to right.
    whole_map: the backbone's whole map (N, h*w, C), not pooled to the grid, for random crops of it
    (picovlm.data.batches.crop_and_pool).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights = backbone_hash(encoder.features)
    ident = f"{root.resolve()}|{cfg.img_size}|{cfg.img_mean}|{cfg.img_std}|{cfg.cnn_grid}|{len(names)}|{weights}"
    ident += ("|mirrored" if mirrored else "") + ("|map" if whole_map else "")
    key = hashlib.sha1(ident.encode()).hexdigest()[:16]
    array_path, meta_path = cache_dir / f"features-{key}.npy", cache_dir / f"features-{key}.json"
    fingerprint = files_fingerprint(root, names)

    def compute() -> tuple[np.ndarray, dict]:
        out = _compute(encoder, images, cfg, batch_size, device, progress, mirrored, whole_map)
        return out, {"root": str(root.resolve()), "size": cfg.img_size, "grid": None if whole_map else cfg.cnn_grid,
                     "mirrored": mirrored, "backbone_sha1": weights, "names": names, "fingerprint": fingerprint}

    return read_or_build_cache(array_path, meta_path, fingerprint, names, compute)[0]


@torch.no_grad()
def _compute(encoder: torch.nn.Module, images: np.ndarray, cfg: VLMConfig, batch_size: int,
             device: str, progress: bool, mirrored: bool, whole_map: bool) -> np.ndarray:
    was_training = encoder.training
    encoder.eval()
    chunks = []
    desc = "caching backbone " + ("maps" if whole_map else "features") + (" of mirrored images" if mirrored else "")
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, disable=not progress):
        chunk = images[start:start + batch_size]  # (b, S, S, 3) uint8
        x = torch.from_numpy(np.array(chunk[:, :, ::-1] if mirrored else chunk))
        x = normalize(x, cfg.img_mean, cfg.img_std).to(device).contiguous(memory_format=torch.channels_last)
        out = encoder.backbone_map(x).flatten(2).transpose(1, 2) if whole_map else encoder.backbone_features(x)
        chunks.append(out.to("cpu", torch.float16).numpy())  # (b, P, C)
    encoder.train(was_training)
    return np.concatenate(chunks)
