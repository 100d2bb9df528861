"""What `--feature-crop` costs per training step: `pico-mobilenet`'s step on cached grid features
against the same step on a random crop of each cached whole map, pooled to the grid first
(picovlm.data.batches.crop_and_pool). Same model, same batches, one process, alternating step by
step. The features are random stand-ins for the cached ones (the cost does not depend on their
values), so no data or backbone weights are needed. Prints JSON.

    python -m benchmarks.feature_crop_cost [--steps 20] [--batch-size 64] [--crop SCALE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from picovlm.config import get_preset, preset_train_config
from picovlm.data.batches import Batch, crop_and_pool
from picovlm.models.mobilenet_v2 import FEATURE_CHANNELS
from picovlm.models.supravl import SupraVL
from picovlm.train import configure_optimizer, resolve_precision, to_device, train_step

CAPTION_TOKENS = 13  # <bos> + a Flickr8k caption's mean 12.6 BPE tokens, rounded; the targets are one shorter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20, help="timed steps of each, alternating")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--crop", type=float, default=preset_train_config("pico-mobilenet").feature_crop,
                   help="smallest share of the map a crop covers (default: pico-mobilenet's)")
    args = p.parse_args()

    cfg = get_preset("pico-mobilenet").with_overrides({"vision_weights": "none"})
    tc = preset_train_config("pico-mobilenet")
    side, grid = cfg.img_size // 32, cfg.cnn_grid
    torch.manual_seed(0)
    model = SupraVL(cfg)
    model.train()
    optimizer, precision = configure_optimizer(model, tc, "cpu"), resolve_precision(tc.precision, "cpu")
    B = args.batch_size
    maps = (torch.rand(B, side * side, FEATURE_CHANNELS) * 6).to(torch.float16)  # ReLU6 range, like the cache
    tokens = torch.randint(4, cfg.lm_vocab_size, (B, CAPTION_TOKENS + 1))
    flippable = torch.ones(B, dtype=torch.bool)

    def step(features: torch.Tensor, n: int) -> None:
        batch = Batch(features, tokens[:, :-1], tokens[:, 1:], flippable, is_features=True)
        train_step(model, optimizer, None, to_device(batch, cfg, "cpu"), tc, precision, "cpu", n)

    grid_features = crop_and_pool(maps, grid, 1.0, None)  # what the cache holds without crops
    seconds: dict[str, list[float]] = {"cached_grid": [], "cropped": [], "crop_and_pool_only": []}
    for n in range(args.steps + 2):  # the first two of each warm up
        start = time.perf_counter()
        step(grid_features, n)
        cached = time.perf_counter() - start
        start = time.perf_counter()
        cropped_features = crop_and_pool(maps, grid, args.crop, torch.rand(B, 3))
        pooled = time.perf_counter() - start
        step(cropped_features, n)
        if n >= 2:
            seconds["cached_grid"].append(cached)
            seconds["cropped"].append(time.perf_counter() - start)
            seconds["crop_and_pool_only"].append(pooled)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(json.dumps({
        "benchmark": "feature_crop_cost", "threads": torch.get_num_threads(), "precision": precision,
        "batch_size": B, "map": f"{side}x{side}", "grid": f"{grid}x{grid}", "crop": args.crop, "steps": args.steps,
        **{f"{name}_ms_median": 1000 * s for name, s in medians.items()},
        "cropped_over_cached": medians["cropped"] / medians["cached_grid"],
    }, indent=2))


if __name__ == "__main__":
    main()
