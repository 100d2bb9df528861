"""Finding and parsing a captioning dataset in Flickr8k's layouts.

Accepted layouts of a data folder:

  A. `Images/` + `captions.txt`  (CSV with header `image,caption`; Kaggle's layout)
  B. `Flicker8k_Dataset/` + `Flickr8k.token.txt`  (lines `name.jpg#0<TAB>caption`; the
     original release; the text files may sit in a `Flickr8k_text/` subfolder)

Splits come from the official lists `Flickr_8k.{train,dev,test}Images.txt` when present,
otherwise from a seeded shuffle (1000 dev, 1000 test, the rest train; an eighth each for
small sets). The built-in shapes dataset is written in layout A, with split lists.
"""

from __future__ import annotations

import csv
import io
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from picovlm.errors import UserError

SPLITS = ("train", "dev", "test")
LAYOUTS_HELP = ("expected either Images/ + captions.txt (CSV with header image,caption) or "
                "Flicker8k_Dataset/ + Flickr8k.token.txt")


@dataclass
class CaptionSet:
    """Images of one split and their reference captions."""

    image_dir: Path
    names: list[str]  # image file names, relative to image_dir
    captions: list[list[str]]  # captions[i] are the references of names[i]

    def __len__(self) -> int:
        return len(self.names)


def _find(root: Path, *candidates: str) -> Path | None:
    for c in candidates:
        for base in (root, root / "Flickr8k_text"):
            if (base / c).exists():
                return base / c
    return None


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        warnings.warn(f"{path} is not valid UTF-8; undecodable bytes were replaced", stacklevel=3)
        return raw.decode("utf-8", errors="replace")


def parse_captions_csv(text: str, source: str = "captions.txt") -> dict[str, list[str]]:
    """CSV with header `image,caption` -> {image: [captions]}. Blank lines are skipped."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
        raise UserError(f"{source}: first line must be the header 'image,caption', got {header!r}")
    out: dict[str, list[str]] = {}
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) < 2:
            raise UserError(f"{source}:{lineno}: expected 'image,caption', got {row!r}")
        # An unquoted caption that contains commas splits into extra cells: join them back.
        image, caption = row[0].strip(), ",".join(row[1:]).strip()
        out.setdefault(image, []).append(caption)
    return out


def parse_token_file(text: str, source: str = "Flickr8k.token.txt") -> dict[str, list[str]]:
    """Lines `image.jpg#N<TAB>caption` -> {image: [captions]}. Blank lines are skipped."""
    out: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line or "#" not in line.split("\t", 1)[0]:
            raise UserError(f"{source}:{lineno}: expected 'image.jpg#N<TAB>caption', got {line[:80]!r}")
        key, caption = line.split("\t", 1)
        out.setdefault(key.rsplit("#", 1)[0].strip(), []).append(caption.strip())
    return out


def load_caption_folder(root: str | Path) -> tuple[Path, dict[str, list[str]]]:
    """Find the layout of `root`; return (image folder, {image name: [captions]})."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}; {LAYOUTS_HELP}")
    csv_path, token_path = _find(root, "captions.txt"), _find(root, "Flickr8k.token.txt")
    if (root / "Images").is_dir() and csv_path:
        image_dir, captions = root / "Images", parse_captions_csv(_read_text(csv_path), str(csv_path))
    elif (root / "Flicker8k_Dataset").is_dir() and token_path:
        image_dir, captions = root / "Flicker8k_Dataset", parse_token_file(_read_text(token_path), str(token_path))
    else:
        raise UserError(f"{root} is not a caption dataset: {LAYOUTS_HELP}")
    n_empty = sum(not c for v in captions.values() for c in v)
    if n_empty:
        warnings.warn(f"{root}: skipped {n_empty} empty caption(s)", stacklevel=2)
    captions = {k: [c for c in v if c] for k, v in captions.items()}
    captions = {k: v for k, v in captions.items() if v}
    if not captions:
        raise UserError(f"{root}: the caption file lists no captions")
    return image_dir, captions


def load_split(root: str | Path, split: str, seed: int = 0) -> CaptionSet:
    """One split of a caption dataset folder, keeping only images that exist on disk."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(root)
    image_dir, captions = load_caption_folder(root)
    list_path = _find(root, f"Flickr_8k.{split}Images.txt")
    if list_path is not None:
        names = [n.strip() for n in _read_text(list_path).splitlines() if n.strip()]
    elif _find(root, "Flickr_8k.trainImages.txt") is not None:
        raise UserError(f"{root} has official split lists but no Flickr_8k.{split}Images.txt; "
                        f"use one of the splits it has")
    else:
        names = _seeded_split(sorted(captions), seed)[split]
    present = [n for n in names if n in captions and (image_dir / n).is_file()]
    if len(present) < len(names):
        warnings.warn(f"{split}: {len(names) - len(present)} of {len(names)} listed images have no "
                      f"captions or no file in {image_dir}; skipped", stacklevel=2)
    if not present:
        raise UserError(f"{root}: the {split} split has no images with captions; {LAYOUTS_HELP}")
    return CaptionSet(image_dir, present, [captions[n] for n in present])


def _seeded_split(names: list[str], seed: int) -> dict[str, list[str]]:
    shuffled = names[:]
    random.Random(seed).shuffle(shuffled)
    n_held = min(1000, len(shuffled) // 8)
    return {"dev": shuffled[:n_held], "test": shuffled[n_held:2 * n_held], "train": shuffled[2 * n_held:]}
