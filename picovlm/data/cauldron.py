"""Image/question/answer data in the Cauldron's format, read with Hugging Face `datasets`.

A row of HuggingFaceM4/the_cauldron (and of any set built here) is

    {"images": [image, ...],                              one or more images
     "texts":  [{"user": str, "assistant": str, "source": str}, ...]}   turns of one conversation

Sources `load_cauldron` reads:

    a folder written by `write_cauldron` / `picovlm data build-cauldron` / `make-vqa`
                                 (data/<split>-*.parquet), or any folder `load_dataset` reads
    a folder from Dataset.save_to_disk
    FILE.parquet or a glob of them
    NAME or NAME:CONFIG          a Hub dataset, e.g. HuggingFaceM4/the_cauldron:vqav2

`mix` combines several with sampling weights; `split_train_val` holds out a validation part.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from picovlm.data.images import load_image
from picovlm.data.stream import import_datasets
from picovlm.errors import UserError, first_line
from picovlm.io import atomic_write

COLUMNS = ("images", "texts")


def load_cauldron(source: str | Path, split: str = "train") -> Any:
    """A Cauldron-format split as a `datasets.Dataset` (images decoded lazily, on access)."""
    datasets = import_datasets()
    path = Path(source)
    try:
        if path.is_dir() and (path / "state.json").is_file():
            ds = datasets.load_from_disk(str(path))
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split)
        elif str(source).endswith(".parquet"):
            ds = datasets.load_dataset("parquet", data_files=str(source), split="train")
        else:
            name, _, config = str(source).partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot read Cauldron data {source} ({split}): {first_line(e)}") from None
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{source} is not in the Cauldron format: no column {', '.join(missing)} "
                        f"(it has {', '.join(ds.column_names)})")
    return ds


def mix(parts: list[tuple[Any, float]], seed: int = 0) -> Any:
    """Several datasets as one stream of rows, drawn with probabilities proportional to the weights,
    until every part has been seen in full."""
    datasets = import_datasets()
    if any(w <= 0 for _, w in parts):
        raise UserError("mixing weights must be positive")
    total = sum(w for _, w in parts)
    columns = [ds.select_columns(list(COLUMNS)) for ds, _ in parts]
    if len(columns) == 1:
        return columns[0].shuffle(seed=seed)
    return datasets.interleave_datasets(columns, probabilities=[w / total for _, w in parts], seed=seed,
                                        stopping_strategy="all_exhausted")


def split_train_val(ds: Any, val_fraction: float = 0.05, seed: int = 0) -> tuple[Any, Any]:
    parts = ds.train_test_split(test_size=val_fraction, seed=seed)
    return parts["train"], parts["test"]


def write_cauldron(rows: Iterable[dict[str, Any]], out: str | Path, split: str = "train") -> Path:
    """Write Cauldron rows (PIL images) as OUT/data/<split>-00000-of-00001.parquet, atomically."""
    datasets = import_datasets()
    features = datasets.Features({
        "images": datasets.Sequence(datasets.Image()),
        "texts": [{"user": datasets.Value("string"), "assistant": datasets.Value("string"),
                   "source": datasets.Value("string")}],
    })
    ds = datasets.Dataset.from_list(list(rows), features=features)
    return _write_parquet(ds, Path(out), split)


def _write_parquet(ds: Any, out: Path, split: str) -> Path:
    (out / "data").mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "data" / f"{split}-00000-of-00001.parquet") as f:  # the layout load_dataset knows
        ds.to_parquet(f)
    return out


def build_cauldron(images_dir: str | Path, jsonl: str | Path, out: str | Path, source: str = "custom",
                   val_fraction: float = 0.0, seed: int = 0) -> dict[str, int]:
    """A Cauldron dataset from a folder of images and a JSONL file, one line per example:

        {"images": ["a.jpg"], "texts": [{"user": "...", "assistant": "..."}, ...]}
        {"image": "a.jpg", "question": "...", "answer": "..."}        (one turn, shorter)

    Every image is opened (a broken one is an error naming its line). Returns rows per split."""
    images_dir, rows = Path(images_dir), []
    try:
        lines = Path(jsonl).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {jsonl}: {first_line(e)}") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            rows.append(_row(line, number, jsonl, images_dir, source))
    if not rows:
        raise UserError(f"{jsonl} has no examples")
    n_val = round(len(rows) * val_fraction)
    if n_val:
        import random

        random.Random(seed).shuffle(rows)
        write_cauldron(rows[:n_val], out, "validation")
    write_cauldron(rows[n_val:], out, "train")
    return {"train": len(rows) - n_val, "validation": n_val}


def _row(line: str, number: int, jsonl: str | Path, images_dir: Path, source: str) -> dict[str, Any]:
    where = f"{jsonl} line {number}"
    try:
        item = json.loads(line)
        names = item["images"] if "images" in item else [item["image"]]
        texts = item.get("texts") or [{"user": item["question"], "assistant": item["answer"]}]
        turns = [{"user": str(t["user"]), "assistant": str(t["assistant"]), "source": t.get("source", source)}
                 for t in texts]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: expected {{\"image\", \"question\", \"answer\"}} or {{\"images\", \"texts\"}} "
                        f"({first_line(e)})") from None
    try:
        images = [load_image(images_dir / name) for name in names]
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return {"images": images, "texts": turns}


def write_shapes_vqa(out: str | Path, n_train: int = 2000, n_val: int = 200, n_multiple_choice: int = 200,
                     size: int = 128) -> Path:
    """The built-in VQA set: Cauldron train/validation splits, and an MMStar-format multiple-choice
    set in OUT/mmstar/ (see picovlm.data.vqa)."""
    from picovlm.data.vqa import multiple_choice_rows, vqa_rows

    datasets = import_datasets()
    out = Path(out)
    write_cauldron(vqa_rows(n_train, size, seed=0), out, "train")
    write_cauldron(vqa_rows(n_val, size, seed=1), out, "validation")
    mc = datasets.Dataset.from_list(list(multiple_choice_rows(n_multiple_choice, size, seed=2)))
    _write_parquet(mc.cast_column("image", datasets.Image()), out / "mmstar", "val")
    return out
