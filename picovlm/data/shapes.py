"""The built-in dataset: synthetic scenes of coloured shapes, with captions that name them.

Every scene holds a group of one to three identical shapes (same colour and kind) and one
other shape, placed so that the group is left of, right of, above or below it, on a
textured background of a random dark colour. Each image gets two captions, the relation
said both ways round:

    "two red circles left of a blue square"
    "a blue square right of two red circles"

Getting a caption right needs colour, shape, count and spatial relation, so the set checks
that a model looks at the whole 4x4 grid, yet a tiny model learns it in a few CPU minutes.
`score_captions` measures exactly that: exact match, and accuracy per attribute.

The set is written in Flickr8k's layout (Images/ + captions.txt + split lists), so the
same loader reads it and users can look at it.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from picovlm.io import atomic_write

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 250),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _phrase(count: int, colour: str, shape: str) -> str:
    return f"{COUNT_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}"


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _background(rng: random.Random, size: int) -> Image.Image:
    base = np.array([rng.randint(0, 90) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 1))
    gradient = np.linspace(-15, 15, size)[None, :, None] * rng.choice([-1, 1])
    pixels = np.clip(base + noise + gradient, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@dataclass(frozen=True)
class Scene:
    """What a scene shows: `count` identical shapes (the group) `relation` one other shape."""

    count: int
    colour: str  # the group's
    shape: str
    other_colour: str  # the single shape's
    other_shape: str
    relation: str  # where the group is, seen from the single shape: "left of", ..., "below"

    def captions(self) -> list[str]:
        group, single = _phrase(self.count, self.colour, self.shape), _phrase(1, self.other_colour, self.other_shape)
        return [f"{group} {self.relation} {single}", f"{single} {INVERSE[self.relation]} {group}"]


def make_scene(rng: random.Random, size: int = 128) -> tuple[Image.Image, list[str]]:
    """One random scene and its two captions."""
    image, scene = draw_scene(rng, size)
    return image, scene.captions()


def draw_scene(rng: random.Random, size: int = 128) -> tuple[Image.Image, Scene]:
    """One random scene and the facts it shows."""
    count = rng.choice([1, 2, 3])
    colour_a, colour_b = rng.sample(list(COLOURS), 2)
    shape_a, shape_b = rng.choice(SHAPES), rng.choice(SHAPES)
    relation = rng.choice(list(INVERSE))
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.07, 0.10)
    # The group goes in one half of the image, the single shape in the other half.
    horizontal = relation in ("left of", "right of")
    group_first = relation in ("left of", "above")  # group in the left/top half
    half = size / 2
    group_lo = 0.0 if group_first else half
    single_lo = half if group_first else 0.0
    # Group members spread along the other axis so they do not overlap.
    slots = [size * (i + 0.5) / count for i in range(count)]
    for along in slots:
        across = group_lo + half * rng.uniform(0.35, 0.65)
        jitter = rng.uniform(-0.08, 0.08) * size / count
        x, y = (across, along + jitter) if horizontal else (along + jitter, across)
        _draw_shape(draw, shape_a, x, y, r if count == 1 else r * 0.8, COLOURS[colour_a])
    across = single_lo + half * rng.uniform(0.35, 0.65)
    along = size * rng.uniform(0.3, 0.7)
    x, y = (across, along) if horizontal else (along, across)
    _draw_shape(draw, shape_b, x, y, r, COLOURS[colour_b])
    return image, Scene(count, colour_a, shape_a, colour_b, shape_b, relation)


def make_shapes_dataset(out: str | Path, n_images: int = 3000, size: int = 128, seed: int = 0,
                        dev_fraction: float = 0.1, test_fraction: float = 0.1) -> Path:
    """Write the shapes dataset to `out` in Flickr8k's layout; return `out`."""
    out = Path(out)
    (out / "Images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    names = []
    for i in range(n_images):
        image, captions = make_scene(rng, size)
        name = f"shapes_{i:05d}.jpg"
        image.save(out / "Images" / name, quality=92)
        names.append(name)
        rows += [(name, c) for c in captions]
    n_dev, n_test = int(n_images * dev_fraction), int(n_images * test_fraction)
    splits = {"dev": names[:n_dev], "test": names[n_dev:n_dev + n_test], "train": names[n_dev + n_test:]}
    for split, split_names in splits.items():
        with atomic_write(out / f"Flickr_8k.{split}Images.txt") as f:
            f.write("".join(n + "\n" for n in split_names).encode())
    # captions.txt last: its presence marks the dataset complete (see ensure_shapes_dataset).
    with atomic_write(out / "captions.txt") as f:
        text = _csv_text([("image", "caption"), *rows])
        f.write(text.encode())
    return out


def _csv_text(rows: list[tuple[str, str]]) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def ensure_shapes_dataset(root: str | Path, n_images: int = 3000, seed: int = 0) -> Path:
    """The shapes dataset at `root`, generated on first use."""
    root = Path(root)
    if not (root / "captions.txt").is_file():
        make_shapes_dataset(root, n_images=n_images, seed=seed)
    return root


_CAPTION_RE = re.compile(
    r"^(a|two|three) (\w+) (circle|square|triangle)s? (left of|right of|above|below) "
    r"(a|two|three) (\w+) (circle|square|triangle)s?$"
)
ATTRIBUTES = ("count", "colour", "shape", "relation")
_WORD_COUNTS = {w: n for n, w in COUNT_WORDS.items()}


def parse_caption(caption: str) -> dict[str, object] | None:
    """Caption -> {count: (n1, n2), colour: (c1, c2), shape: (s1, s2), relation}, or None."""
    m = _CAPTION_RE.match(caption.strip())
    if not m:
        return None
    n1, c1, s1, rel, n2, c2, s2 = m.groups()
    return {"count": (_WORD_COUNTS[n1], _WORD_COUNTS[n2]), "colour": (c1, c2),
            "shape": (s1, s2), "relation": rel}


def score_captions(generated: list[str], references: list[list[str]]) -> dict[str, float]:
    """Exact match (caption equals one of the references), parse rate, per-attribute accuracy.

    Each generated caption is compared with whichever reference phrasing it matches best, so
    saying the relation the other way round is not penalised.
    """
    exact = parsed = 0
    correct = dict.fromkeys(ATTRIBUTES, 0)
    for gen, refs in zip(generated, references, strict=True):
        exact += gen in refs
        g = parse_caption(gen)
        if g is None:
            continue
        parsed += 1
        best = max((parse_caption(r) for r in refs), key=lambda r: sum(g[a] == r[a] for a in ATTRIBUTES))
        for a in ATTRIBUTES:
            correct[a] += g[a] == best[a]
    n = max(len(generated), 1)
    scores = {"exact_match": exact / n, "parsed": parsed / n}
    scores.update({f"{a}_acc": correct[a] / n for a in ATTRIBUTES})
    scores["attribute_acc"] = sum(correct.values()) / (n * len(ATTRIBUTES))
    return scores
