"""Is bf16 autocast faster than fp32 for training supravl-nano on this CPU? Prints JSON.

Both precisions train the same model from the same initial weights on the same batches, in
one process, alternating in rounds so that machine noise hits both alike.

    python benchmarks/train_precision.py [--rounds 3] [--steps 20] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from picovlm.config import TrainConfig, supravl_nano
from picovlm.models.supravl import SupraVL
from picovlm.train import autocast_context, configure_optimizer


def samples_per_s(model: SupraVL, precision: str, batches: list, device: str = "cpu") -> float:
    opt = configure_optimizer(model, TrainConfig(), device)
    t0 = time.perf_counter()
    for images, ids, targets in batches:
        with autocast_context(precision, device):
            _, loss = model(images, ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return len(batches) * batches[0][0].shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-len", type=int, default=32, help="text positions per batch (Flickr8k: ~30)")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = supravl_nano()
    base = SupraVL(cfg)
    batches = [(torch.randn(args.batch_size, 3, cfg.img_size, cfg.img_size),
                torch.randint(3, cfg.lm_vocab_size, (args.batch_size, args.text_len)),
                torch.randint(3, cfg.lm_vocab_size, (args.batch_size, args.text_len))) for _ in range(args.steps)]
    results: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for precision in results:
            results[precision].append(samples_per_s(copy.deepcopy(base), precision, batches))
    best = {k: max(v) for k, v in results.items()}
    print(json.dumps({
        "benchmark": "train_precision", "model": "supravl-nano", "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "samples_per_s": results, "best_samples_per_s": best,
        "bf16_over_fp32": best["bf16"] / best["fp32"],
    }, indent=2))


if __name__ == "__main__":
    main()
