"""Captioning speed: picovlm's batched KV-cache decoding against the straightforward decoder.

The baseline is the published model's own way (benchmarks/published_supravl.py): the same
weights, recomputing the whole sequence at every step, one beam (and one image) at a time.
Both caption the same images in one process; the captions must be identical. Prints JSON.

    python benchmarks/caption_speed.py --model runs/demo/best [--data DIR] [--n-single 20] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import picovlm
from benchmarks.published_supravl import generate_beam, generate_greedy, load_published
from picovlm.data.flickr8k import load_split
from picovlm.data.prepare import default_data_dir
from picovlm.generate import GenerationConfig, generate, preprocess


def timed(fn: Callable[[torch.Tensor], list[str]], pixels: torch.Tensor) -> tuple[float, list[str]]:
    t0 = time.perf_counter()
    out = fn(pixels)
    return time.perf_counter() - t0, out


def decode_in_rounds(model: torch.nn.Module, pixels: torch.Tensor, configs: dict[str, GenerationConfig],
                     rounds: int) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Decode the same pixels with each config in turn, `rounds` times over, so that machine noise
    hits every arm alike: the median seconds of each, and the tokens of its last round."""
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(rounds):
        for name, gen in configs.items():
            elapsed, tokens[name] = timed(lambda x, gen=gen: generate(model, x, gen), pixels)
            seconds[name].append(elapsed)
    return {name: statistics.median(s) for name, s in seconds.items()}, tokens


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a supravl checkpoint folder")
    p.add_argument("--data", default=None, help="dataset folder for images (default: built-in shapes, dev)")
    p.add_argument("--n-single", type=int, default=20, help="images timed one at a time")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()

    ours = picovlm.load(args.model)
    ref, tokenizer, cfg = load_published(Path(args.model))
    data = load_split(args.data or default_data_dir(), "dev")
    paths = [data.image_dir / n for n in data.names[:max(args.n_single, args.batch)]]
    pixels = preprocess(paths, ours)  # the same normalised pixels for both decoders
    strategies = {"greedy": (GenerationConfig(strategy="greedy"),
                             lambda x: generate_greedy(ref, tokenizer, cfg, x, cfg["MAX_SEQ"])),
                  "beam3": (GenerationConfig(strategy="beam", beam_width=3),
                            lambda x: generate_beam(ref, tokenizer, cfg, x, 3, cfg["MAX_SEQ"]))}

    report: dict = {"benchmark": "caption_speed", "model": args.model, "threads": torch.get_num_threads(),
                    "one_image": {}, f"batch_{args.batch}": {}}
    identical = True
    for name, (gen, naive_one) in strategies.items():
        def picovlm_fn(x: torch.Tensor, gen: GenerationConfig = gen) -> list[str]:
            return [ours.tokenizer.decode(ids) for ids in generate(ours, x, gen)]

        def naive_fn(x: torch.Tensor, naive_one: Callable = naive_one) -> list[str]:
            return [naive_one(x[i:i + 1]) for i in range(len(x))]  # one image at a time

        picovlm_fn(pixels[:2])  # warm-up
        ours_ms, naive_ms = [], []
        for i in range(args.n_single):
            t_ours, c_ours = timed(picovlm_fn, pixels[i:i + 1])
            t_naive, c_naive = timed(naive_fn, pixels[i:i + 1])
            identical &= c_ours == c_naive
            ours_ms.append(1000 * t_ours)
            naive_ms.append(1000 * t_naive)
        report["one_image"][name] = {
            "picovlm_ms_p50": statistics.median(ours_ms), "picovlm_ms_p95": percentile(ours_ms, 0.95),
            "naive_ms_p50": statistics.median(naive_ms), "naive_ms_p95": percentile(naive_ms, 0.95),
            "speedup_p50": statistics.median(naive_ms) / statistics.median(ours_ms)}
        batch = pixels[:args.batch]
        t_ours, c_ours = timed(picovlm_fn, batch)
        t_naive, c_naive = timed(naive_fn, batch)
        identical &= c_ours == c_naive
        report[f"batch_{args.batch}"][name] = {
            "picovlm_captions_per_s": len(batch) / t_ours, "naive_captions_per_s": len(batch) / t_naive,
            "speedup": t_naive / t_ours}
    report["identical_captions"] = identical
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
