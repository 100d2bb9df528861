"""How sure is a caption score? Bootstrap intervals over a split's images, and paired comparisons.

A tiny captioner's dev BLEU-4 moves by half a point or more between two seeds of one recipe, or
between two decodings of one checkpoint: 1,000 images are a small sample of the images a model
could be asked about. Drawing the images again with replacement (the bootstrap; Koehn 2004 for
machine translation) shows how far a score could move on another sample of the same size.
Drawing two systems' captions of the same images together (the paired bootstrap) shows whether
one is ahead on most such samples or only on this one.

Corpus metrics need care. BLEU is not a mean of per-image scores: pycocoevalcap sums each image's
clipped n-gram matches, n-gram counts and lengths over the split, then combines the sums once. So
each image gives a row of those statistics, a resample sums its rows, and the sums are combined
as pycocoevalcap combines them; on the split itself that is pycocoevalcap's BLEU to the last
digit. ROUGE-L and CIDEr-D are means of per-image scores (CIDEr-D keeps the document frequencies
of the whole split's references, as is usual). METEOR is left out: its corpus score is the METEOR
jar's own aggregate, neither a sum nor a mean of per-image parts.

    bleu      (N, 10)  per image: caption length, closest reference length, matched n-grams
                       (n = 1..4), all n-grams (n = 1..4)
    weights   (R, N)   how many times each of R resamples draws each image (each row sums to N)
    weights @ bleu     (R, 10): one row of corpus statistics per resample -> BLEU-n (R,)
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picovlm.errors import UserError
from picovlm.evaluate import ptb_tokenize
from picovlm.generate import BleuReferences

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's guards against 0 / 0, kept so the scores match it exactly


@dataclass
class ImageScores:
    """Each image's part of every metric in METRICS, for one system's captions of N images."""

    bleu: np.ndarray  # (N, 10), see the module docstring
    rouge: np.ndarray  # (N,) ROUGE-L of each caption
    cider: np.ndarray  # (N,) CIDEr-D of each caption

    @classmethod
    def from_tokenized(cls, gts: dict[int, list[str]], res: dict[int, list[str]]) -> ImageScores:
        """Each image's BLEU statistics, ROUGE-L and CIDEr-D from picovlm.evaluate.ptb_tokenize's output."""
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        rows = []
        for i in range(len(res)):
            words = res[i][0].split()
            matched, closest = BleuReferences([r.split() for r in gts[i]]).statistics(words)
            rows.append([len(words), closest, *matched, *(max(len(words) - n + 1, 0) for n in range(1, 5))])
        with contextlib.redirect_stdout(io.StringIO()):
            _, rouge = Rouge().compute_score(gts, res)
            _, cider = Cider().compute_score(gts, res)
        return cls(np.array(rows, dtype=np.float64), np.asarray(rouge, np.float64), np.asarray(cider, np.float64))

    def corpus(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every metric of every resample: weights (R, N) -> {metric: (R,)}. A row of ones is the
        split itself."""
        sums = weights @ self.bleu  # (R, 10)
        length, closest, matched, total = sums[:, 0], sums[:, 1], sums[:, 2:6], sums[:, 6:10]
        ratio = (length + _TINY) / (closest + _SMALL)
        brevity = np.exp(np.minimum(0.0, 1.0 - 1.0 / ratio))
        log_precision = np.cumsum(np.log((matched + _TINY) / (total + _SMALL)), axis=1)  # (R, 4)
        scores = {f"BLEU-{n}": brevity * np.exp(log_precision[:, n - 1] / n) for n in range(1, 5)}
        drawn = weights.sum(1)
        scores["ROUGE-L"] = weights @ self.rouge / drawn
        scores["CIDEr"] = weights @ self.cider / drawn
        return scores

    def intervals(self, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
        """{metric: (low, high)}: the central `level` share of each metric over `resamples` resamples
        of the images (percentile bootstrap), on the metric's own scale."""
        drawn = self.corpus(_resample_weights(len(self.bleu), resamples, seed))
        return {m: _interval(drawn[m], level) for m in METRICS}


def image_scores(references: Sequence[Sequence[str]], generated: Sequence[str]) -> ImageScores:
    """Tokenise as pycocoevalcap does, then each image's BLEU statistics, ROUGE-L and CIDEr-D."""
    return ImageScores.from_tokenized(*ptb_tokenize(references, generated))


def _resample_weights(n_images: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n_images): how often each resample draws each image, with replacement."""
    if resamples < 1:  # numpy would fail later with an IndexError (0 rows) or its own ValueError
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=resamples).astype(np.float64)


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_intervals(references: Sequence[Sequence[str]], generated: Sequence[str], resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """ImageScores.intervals of these captions: each metric's bootstrap interval."""
    return image_scores(references, generated).intervals(resamples, seed, level)


def paired_bootstrap(references: Sequence[Sequence[str]], generated_a: Sequence[str], generated_b: Sequence[str],
                     resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """B against A on the same images and references, each resample drawing the same images for
    both: {metric: {a, b, difference (b - a), interval (of b - a), b_ahead (share of resamples
    where B scores higher)}}."""
    if len(generated_a) != len(generated_b):
        raise ValueError("A and B must caption the same images")
    gts, res_a, res_b = ptb_tokenize(references, generated_a, generated_b)
    a, b = ImageScores.from_tokenized(gts, res_a), ImageScores.from_tokenized(gts, res_b)
    whole = np.ones((1, len(generated_a)))
    point_a, point_b = a.corpus(whole), b.corpus(whole)
    weights = _resample_weights(len(generated_a), resamples, seed)
    drawn_a, drawn_b = a.corpus(weights), b.corpus(weights)
    return {m: {"a": float(point_a[m][0]), "b": float(point_b[m][0]),
                "difference": float(point_b[m][0] - point_a[m][0]),
                "interval": _interval(drawn_b[m] - drawn_a[m], level),
                "b_ahead": float(np.mean(drawn_b[m] > drawn_a[m]))} for m in METRICS}


def read_eval(path: str | Path) -> dict[str, Any]:
    """An eval.json that `picovlm eval --out` wrote, given as the file or its folder."""
    path = Path(path)
    file = path / "eval.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{path}: no eval.json there; write one with picovlm eval --out DIR")
    try:
        result = json.loads(file.read_text())
        captions = result["captions"]
        _ = [(row["image"], row["caption"], row["references"]) for row in captions]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{file}: not an eval.json from picovlm eval ({type(e).__name__}: {e}); "
                        "write it again with picovlm eval --out DIR") from None
    if not captions:
        raise UserError(f"{file}: holds no captions; evaluate at least one image")
    return result


def compare_evals(path_a: str | Path, path_b: str | Path, resamples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, Any]:
    """paired_bootstrap of two `picovlm eval --out` results of the same images (= picovlm compare)."""
    a, b = read_eval(path_a), read_eval(path_b)
    images_a = [row["image"] for row in a["captions"]]
    if images_a != [row["image"] for row in b["captions"]]:
        raise UserError(f"{path_a} and {path_b} caption different images; evaluate both on the same split "
                        "with the same --limit")
    if [row["references"] for row in a["captions"]] != [row["references"] for row in b["captions"]]:
        raise UserError(f"{path_a} and {path_b} hold different references for the same images; evaluate "
                        "both against the same dataset folder")
    references = [row["references"] for row in a["captions"]]
    metrics = paired_bootstrap(references, [row["caption"] for row in a["captions"]],
                               [row["caption"] for row in b["captions"]], resamples, seed, level)
    describe = {name: {k: r.get(k) for k in ("split", "strategy", "generation")} for name, r in (("a", a), ("b", b))}
    return {"n_images": len(images_a), "resamples": resamples, "level": level, **describe, "metrics": metrics}
