"""Write a captioning folder (Flickr8k layout) as WebDataset tar shards, the format picovlm streams.

    picovlm data make-shards DATA OUT [--per-shard 1000]

OUT/train/000000.tar, ... and OUT/dev/000000.tar, ...: one sample per (image, caption) pair,
KEY.jpg (the original file's bytes, unchanged) + KEY.txt (the caption), in a random order so
that each shard is a fair sample. The same layout img2dataset produces, so a tiny set made
here and a CC3M-scale set downloaded by img2dataset train the same way.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

from picovlm.data.flickr8k import load_split
from picovlm.io import atomic_write


def write_shards(data_dir: str | Path, out_dir: str | Path, per_shard: int = 1000, seed: int = 0) -> dict[str, int]:
    """Shard the train and dev splits of `data_dir` into `out_dir`; returns the shard count per split."""
    counts = {}
    for split in ("train", "dev"):
        data = load_split(Path(data_dir), split)
        pairs = [(name, cap) for name, caps in zip(data.names, data.captions) for cap in caps]
        random.Random(seed).shuffle(pairs)
        folder = Path(out_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        shards = [pairs[i:i + per_shard] for i in range(0, len(pairs), per_shard)]
        for s, shard in enumerate(shards):
            with atomic_write(folder / f"{s:06d}.tar") as f, tarfile.open(fileobj=f, mode="w") as tar:
                for k, (name, caption) in enumerate(shard):
                    key = f"{s:06d}{k:06d}"
                    suffix = Path(name).suffix.lower().lstrip(".") or "jpg"
                    _add(tar, f"{key}.{suffix}", (data.image_dir / name).read_bytes())
                    _add(tar, f"{key}.txt", caption.encode())
        counts[split] = len(shards)
    return counts


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
