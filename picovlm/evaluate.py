"""Caption evaluation: the standard COCO-caption metrics, diversity, and a readable report.

Quality uses `pycocoevalcap`, the reference implementation everyone reports with: captions and
references go through its PTB tokenizer (Java), then BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D
are computed against all references of each image. SPICE is left out: it needs a Stanford
CoreNLP download that this offline setting cannot make.

Tiny captioners tend to repeat a few generic sentences, which those metrics barely punish, so
diversity is reported beside them: distinct-1/2 (unique n-grams / all n-grams over the split),
the vocabulary used, the share of unique captions, the share copied verbatim from the training
captions, and the mean length in words.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from picovlm.data.flickr8k import load_split
from picovlm.data.images import load_image
from picovlm.errors import UserError
from picovlm.generate import ngrams, resolve_generation
from picovlm.models.supravl import SupraVL
from picovlm.tokenizer import clean_caption


def ptb_tokenize(references: Sequence[Sequence[str]],
                 *generated: Sequence[str]) -> tuple[dict[int, list[str]], ...]:
    """References and each system's captions as pycocoevalcap scores them (PTB-tokenised,
    lowercased, punctuation dropped), keyed by image position: ({i: [reference, ...]}, {i: [caption]},
    ...); the references are tokenised once however many systems are given."""
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise UserError("caption metrics need pycocoevalcap and Java: pip install 'picovlm[eval]'") from None
    if not generated or any(len(references) != len(captions) or not captions for captions in generated):
        raise ValueError("need one generated caption per image and at least one image")
    gts = {i: [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    with contextlib.redirect_stdout(io.StringIO()):  # the tokenizer prints progress chatter
        tokenizer = PTBTokenizer()
        return tokenizer.tokenize(gts), *(tokenizer.tokenize({i: [{"caption": g}] for i, g in enumerate(captions)})
                                          for captions in generated)


def coco_metrics(references: Sequence[Sequence[str]], generated: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, PTB-tokenised), each in [0, 1] (CIDEr: [0, 10])."""
    return tokenized_metrics(*ptb_tokenize(references, generated))


def tokenized_metrics(gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
    """coco_metrics of references and captions that ptb_tokenize has already tokenised."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress chatter
        bleu, _ = Bleu(4).compute_score(gts, res)
        meteor, _ = Meteor().compute_score(gts, res)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores.update({"METEOR": float(meteor), "ROUGE-L": float(rouge), "CIDEr": float(cider)})
    return scores


def diversity_metrics(generated: Sequence[str], train_captions: Sequence[str] = ()) -> dict[str, float]:
    """Distinct-1/2, vocabulary used, unique-caption share, copied-from-train share, mean length."""
    tokenised = [clean_caption(c).split() for c in generated]
    scores: dict[str, float] = {}
    for n in (1, 2):
        grams = [g for words in tokenised for g in ngrams(words, n)]
        scores[f"distinct-{n}"] = len(set(grams)) / max(len(grams), 1)
    cleaned = [" ".join(words) for words in tokenised]
    train = {clean_caption(c) for c in train_captions}
    scores["vocabulary"] = len({w for words in tokenised for w in words})
    scores["unique_captions"] = len(set(cleaned)) / max(len(cleaned), 1)
    scores["copied_from_train"] = sum(c in train for c in cleaned) / max(len(cleaned), 1)
    scores["mean_length"] = sum(map(len, tokenised)) / max(len(tokenised), 1)
    return scores


def evaluate_captions(model: SupraVL, data_dir: str | Path, split: str = "dev", strategy: str | None = None,
                      limit: int | None = None, **generation: Any) -> dict[str, Any]:
    """Caption a split and score it; returns metrics plus every caption with its references. With no
    strategy, the model's own decoding (see picovlm.generate.resolve_generation); the result names
    every setting that ran, and a 95 % bootstrap interval of each metric but METEOR (see
    picovlm.significance)."""
    from picovlm.significance import ImageScores  # imported here: it builds on this module

    gen = dataclasses.asdict(resolve_generation(model, strategy, **generation))
    data = load_split(data_dir, split)
    names, refs = data.names[:limit], data.captions[:limit]
    generated = model.caption([data.image_dir / n for n in names], **gen)
    train_captions = [c for caps in load_split(data_dir, "train").captions for c in caps] if split != "train" else []
    strategy = gen.pop("strategy")
    gts, res = ptb_tokenize(refs, generated)  # once, for the metrics and their intervals
    return {
        "split": split, "strategy": strategy, "generation": gen, "n_images": len(names),
        "metrics": tokenized_metrics(gts, res),
        "intervals": ImageScores.from_tokenized(gts, res).intervals(),
        "diversity": diversity_metrics(generated, train_captions),
        "captions": [{"image": n, "caption": g, "references": r} for n, g, r in zip(names, generated, refs)],
        "image_dir": str(data.image_dir),
    }


def write_report(result: dict[str, Any], out_dir: str | Path, grid_size: int = 12) -> Path:
    """eval.json, report.md and examples.png (images with generated and reference captions)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    _plot_examples(result, out / "examples.png", grid_size)
    m, d = result["metrics"], result["diversity"]
    lines = [
        f"# Caption evaluation: {result['split']} split, {result['strategy']} decoding",
        "", f"{result['n_images']} images, all references per image; pycocoevalcap with its PTB tokenizer.", "",
        "| " + " | ".join(m) + " |", "|" + " --- |" * len(m),
        "| " + " | ".join(f"{100 * v:.1f}" for v in m.values()) + " |",
        "| " + " | ".join(_interval_text(result.get("intervals", {}).get(k)) for k in m) + " |",
        "", "Scores x 100 (CIDEr too, as is customary); the second row: the 95 % interval of each over "
        "1,000 resamples of the images (bootstrap; METEOR has none, see picovlm.significance).", "", "## Diversity", "",
        "| " + " | ".join(d) + " |", "|" + " --- |" * len(d),
        "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in d.values()) + " |",
        "", "## Examples", "", "![examples](examples.png)", "",
    ]
    for row in result["captions"][:grid_size]:
        lines.append(f"- `{row['image']}`: **{row['caption']}** (reference: {row['references'][0]})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out


def _interval_text(interval: Sequence[float] | None) -> str:
    return "-" if interval is None else f"{100 * interval[0]:.1f}-{100 * interval[1]:.1f}"


def _plot_examples(result: dict[str, Any], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["captions"][:n]
    cols = 4
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(4 * cols, 4.2 * -(-len(rows) // cols)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(load_image(Path(result["image_dir"]) / row["image"]))
        ax.set_title(f"{row['caption']}\nref: {row['references'][0]}", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
