"""`picovlm demo`: the README's first command. Train supravl-nano on the built-in shapes
dataset for a few CPU minutes, then caption dev images and score the captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from picovlm.checkpoint import from_pretrained
from picovlm.config import TrainConfig, supravl_nano
from picovlm.data.flickr8k import load_split
from picovlm.data.prepare import default_data_dir
from picovlm.data.shapes import score_captions
from picovlm.models.supravl import SupraVL
from picovlm.train import train


def shapes_accuracy(model: SupraVL, data_dir: Path, split: str = "dev", strategy: str = "greedy") -> dict[str, Any]:
    """Caption every image of a shapes split; exact match and per-attribute accuracy."""
    data = load_split(data_dir, split)
    captions = model.caption([data.image_dir / n for n in data.names], strategy=strategy)
    return {"split": split, "strategy": strategy, "n_images": len(data),
            **score_captions(captions, data.captions)}


def run_demo(out: Path, max_steps: int = 1500, n_images: int = 3000, show: int = 8) -> dict[str, Any]:
    data_dir = default_data_dir(n_images)
    if (out / "train_config.json").is_file():
        shutil.rmtree(out)  # a previous demo run: start afresh
    print(f"training supravl-nano on the built-in shapes dataset ({data_dir}) for {max_steps} steps")
    tc = TrainConfig(epochs=1000, max_steps=max_steps, warmup_steps=50, lr=1e-3, min_lr=1e-4)
    summary = train(supravl_nano(), tc, out, data_dir=data_dir)
    model = from_pretrained(out / "best")
    dev = load_split(data_dir, "dev")
    print(f"\ncaptions of {show} dev images (beam search, width 3):")
    captions = model.caption([dev.image_dir / n for n in dev.names[:show]], strategy="beam")
    for name, caption, refs in zip(dev.names, captions, dev.captions):
        print(f"  {name}: {caption!r:<48} reference: {refs[0]!r}")
    scores = {s: shapes_accuracy(model, data_dir, "dev", s) for s in ("greedy", "beam")}
    report = {"train": summary, "dev_accuracy": scores}
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    print("\ndev-split accuracy:")
    for strategy, s in scores.items():
        print(f"  {strategy:<6} exact match {s['exact_match']:.1%}, attributes {s['attribute_acc']:.1%} "
              f"(count {s['count_acc']:.0%}, colour {s['colour_acc']:.0%}, shape {s['shape_acc']:.0%}, "
              f"relation {s['relation_acc']:.0%})")
    print(f"\ncheckpoint: {out / 'best'}   loss curve: {out / 'loss.png'}")
    print(f"caption your own image: picovlm caption IMAGE.jpg --model {out / 'best'}")
    return report
