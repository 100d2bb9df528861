"""Reading images safely, and the on-disk uint8 cache that keeps JPEG decoding out of training.

`load_image` is the one place an image file is opened: EXIF rotation is honoured, any mode
(palette, alpha, 16-bit, CMYK, greyscale) becomes 8-bit RGB, and a decompression bomb is
refused. Every failure is a `UserError` naming the file.

`cached_images` decodes and resizes a list of files once into `<cache>/<key>.npy`, an array
of shape (N, S, S, 3) uint8, next to a JSON file recording where it came from. The key
depends on the source folder and the size; the JSON's fingerprint (names, byte sizes and
modification times of the files) decides whether an existing cache is still valid. Processes
that want the same cache at once build it once (`read_or_build_cache`, under a lock file).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, ImageOps
from tqdm import tqdm

from picovlm.errors import UserError
from picovlm.io import atomic_write

MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs well before they fill memory


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB, upright. Raises UserError if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    return _decode(path, str(path))


def decode_image(data: bytes, name: str = "upload") -> Image.Image:
    """The same as load_image, for bytes received from elsewhere (an HTTP upload)."""
    return _decode(io.BytesIO(data), name)


def _decode(source: Path | io.BytesIO, path: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{path}: {im.width}x{im.height} pixels is too large (decompression bomb?); "
                                f"resize it below {MAX_IMAGE_PIXELS} pixels")
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"cannot read image {path}: {e}; check that the file is a complete image") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit greyscale rescaled, transparency over white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        arr = np.asarray(im, dtype=np.float64)
        top = arr.max() if arr.max() > 0 else 1.0
        im = Image.fromarray((arr / top * 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))  # alpha over white
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def resize_square(im: Image.Image, size: int) -> np.ndarray:
    """Resize to size x size -> (S, S, 3) uint8.

    Bilinear and aspect not kept: what the published model's `T.Resize((S, S))` does to a PIL
    image, so a picovlm checkpoint sees the same pixels in either codebase.
    """
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize(images_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised with mean/std.

    `transform` (e.g. augmentation) sees the images as floats in [0, 1] before normalising.
    """
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    if transform is not None:
        x = transform(x)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def default_cache_dir() -> Path:
    return Path(os.environ.get("PICOVLM_CACHE", Path.home() / ".cache" / "picovlm"))


def files_fingerprint(root: Path, names: list[str]) -> str:
    h = hashlib.sha1()
    for name in names:
        try:
            st = (root / name).stat()
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{name}\0missing\n".encode())
    return h.hexdigest()


def cached_images(root: Path, names: list[str], size: int, cache_dir: Path | None = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Decode `root/name` for every name into a (N, size, size, 3) uint8 array, cached on disk.

    Returns (images, ok): ok[i] is False where the file could not be read; those files are
    skipped with one warning that counts them and names the first few.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha1(f"{root.resolve()}|{size}|{len(names)}".encode()).hexdigest()[:16]
    array_path, meta_path = cache_dir / f"images-{key}.npy", cache_dir / f"images-{key}.json"
    fingerprint = files_fingerprint(root, names)

    def decode_all() -> tuple[np.ndarray, dict]:
        images = np.zeros((len(names), size, size, 3), dtype=np.uint8)
        ok = np.ones(len(names), dtype=bool)
        failures: list[str] = []
        bar = tqdm(names, desc=f"caching images at {size}px", unit="img", leave=False, disable=not progress)
        for i, name in enumerate(bar):
            try:
                images[i] = resize_square(load_image(root / name), size)
            except UserError as e:
                ok[i] = False
                failures.append(str(e))
        if failures:
            shown = "; ".join(failures[:3])
            # stacklevel 4: the warning points at the caller of cached_images
            warnings.warn(f"skipped {len(failures)} unreadable image(s) of {len(names)}: {shown}", stacklevel=4)
        return images, {"root": str(root.resolve()), "size": size, "names": names, "fingerprint": fingerprint,
                        "ok": ok.tolist()}

    images, meta = read_or_build_cache(array_path, meta_path, fingerprint, names, decode_all)
    return images, np.array(meta["ok"], dtype=bool)


def read_or_build_cache(array_path: Path, meta_path: Path, fingerprint: str, names: list[str],
                        build: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """The cached array and its JSON if they still describe these files, else build()'s, written there.

    The build runs under a lock file beside the array, so that processes wanting the same cache
    (two training runs on one dataset, started together) build it once: the others wait, then
    read what the first wrote. A valid cache is read without the lock, so a read-only cache
    folder still serves."""
    cached = read_array_cache(array_path, meta_path, fingerprint, names)
    if cached is not None:
        return cached
    array_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{array_path}.lock"):
        cached = read_array_cache(array_path, meta_path, fingerprint, names)  # built while this one waited
        if cached is not None:
            return cached
        array, meta = build()
        write_array_cache(array_path, meta_path, array, meta)
    return array, meta


def read_array_cache(array_path: Path, meta_path: Path, fingerprint: str,
                     names: list[str]) -> tuple[np.ndarray, dict] | None:
    """A cached array (memory-mapped) and its JSON, if both exist and still describe these files."""
    if not (meta_path.is_file() and array_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint and meta.get("names") == names:
            return np.load(array_path, mmap_mode="r"), meta
    except (OSError, ValueError):
        pass  # unreadable cache: rebuild it
    return None


def write_array_cache(array_path: Path, meta_path: Path, array: np.ndarray, meta: dict) -> None:
    """Array first, JSON last (each atomically): the JSON's presence marks a complete cache. The
    folder exists: read_or_build_cache, the one caller, made it for its lock file."""
    with atomic_write(array_path) as f:
        np.save(f, array)
    with atomic_write(meta_path) as f:
        f.write(json.dumps(meta).encode())
