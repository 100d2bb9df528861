"""Training throughput: picovlm's training step against the straightforward one. Prints JSON.

Both train supravl-nano from the same initial weights on the same batches (same seed, same
order, same pixels), in one process, alternating step by step so machine noise hits both alike:

    baseline  the published module layout (benchmarks/published_supravl.py): manual softmax
              attention, unfused ops, fp32, every image decoded from its JPEG at every step
    picovlm   picovlm.train.train_step: scaled_dot_product_attention, `--precision auto`
              (bf16 autocast on CPUs with bf16 instructions; then attention by the math
              kernel), channels-last convolutions, images from the uint8 cache, normalised
              on the fly

After N steps both are scored on the same held-out batches (fp32), so "faster at equal loss"
can be checked. Achieved GFLOPS (forward + backward, counted by torch's FlopCounterMode) are
put beside the matmul peak measured in the same run.

    python -m benchmarks.train_throughput [--data DIR] [--steps 30] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.published_supravl import RefVLM
from picovlm.checkpoint import config_to_json
from picovlm.config import TrainConfig, supravl_nano
from picovlm.data.batches import Batch, CaptionBatches
from picovlm.data.flickr8k import load_split
from picovlm.data.images import load_image, normalize, resize_square
from picovlm.data.prepare import default_data_dir
from picovlm.models.supravl import IGNORE_INDEX, SupraVL
from picovlm.tokenizer import CaptionTokenizer
from picovlm.train import (
    configure_optimizer,
    get_lr,
    resolve_precision,
    to_channels_last,
    to_device,
    train_step,
)


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Best GFLOPS of an n x n x n matmul in `dtype` over about `seconds`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def decode_batch(data: CaptionBatches, image_dir: Path, batch: Batch, pair_idx: torch.Tensor) -> torch.Tensor:
    """The baseline's input path: open, decode and resize every JPEG of the batch, then normalise."""
    cfg = supravl_nano()
    names = [data.names[i] for i in data.image_of[pair_idx].tolist()]
    pixels = [torch.tensor(resize_square(load_image(image_dir / n), cfg.img_size)) for n in names]
    return normalize(torch.stack(pixels), cfg.img_mean, cfg.img_std)


def baseline_step(model: RefVLM, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  input_ids: torch.Tensor, targets: torch.Tensor, tc: TrainConfig) -> float:
    logits = model(model.vis_enc(images), input_ids)[:, model.n_vis:]  # (B, T, V), text positions
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    return loss.item()


def training_flops(model: SupraVL, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], loss_only: bool) -> int:
    """Forward + backward FLOPs of one step on this batch (matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        _, loss = model(*batch, loss_only=loss_only)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def held_out_loss(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    total, n = 0.0, 0
    for images, ids, targets in batches:
        logits = forward(images, ids)
        k = int((targets != IGNORE_INDEX).sum())
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum").item()
        n += k
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=None, help="dataset folder (default: the built-in shapes set)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (allocator, caches)")
    p.add_argument("--compile", action="store_true", help="add a third arm: picovlm under torch.compile")
    args = p.parse_args()

    cfg, tc = supravl_nano(), TrainConfig(batch_size=args.batch_size, warmup_steps=10)
    data_dir = Path(args.data) if args.data else default_data_dir()
    train_set, dev_set = load_split(data_dir, "train"), load_split(data_dir, "dev")
    tokenizer = CaptionTokenizer.train((c for caps in train_set.captions for c in caps), cfg.lm_vocab_size)
    train_data, dev_data = CaptionBatches(train_set, tokenizer, cfg), CaptionBatches(dev_set, tokenizer, cfg)
    precision = resolve_precision("auto", "cpu")

    torch.manual_seed(tc.seed)
    ours = SupraVL(cfg)
    baseline = RefVLM(config_to_json(cfg))
    baseline.load_state_dict(ours.state_dict(), strict=False)  # same initial weights
    baseline.lm_head.weight = baseline.tok_emb.weight
    compiled = copy.deepcopy(ours) if args.compile else None
    to_channels_last(ours)  # as picovlm.train.train does
    opt_ours, opt_base = configure_optimizer(ours, tc, "cpu"), configure_optimizer(baseline, tc, "cpu")
    arms = {"picovlm": (ours, opt_ours)}
    if compiled is not None:
        to_channels_last(compiled)
        arms["picovlm_compiled"] = (torch.compile(compiled), configure_optimizer(compiled, tc, "cpu"))
    first_step_s: dict[str, float] = {}

    total = args.warmup_steps + args.steps
    order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(tc.seed))
    times: dict[str, list[float]] = {name: [] for name in ("baseline", *arms)}
    losses: dict[str, list[float]] = {name: [] for name in times}
    flops = {name: 0 for name in times}
    flop_model = SupraVL(cfg)
    for step in range(total):
        pair_idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        lr = get_lr(step, total, tc)
        for opt in (opt_base, *(o for _, o in arms.values())):
            for group in opt.param_groups:
                group["lr"] = lr

        t0 = time.perf_counter()
        batch = train_data.batch(pair_idx)
        images = decode_batch(train_data, train_set.image_dir, batch, pair_idx)
        loss_base = baseline_step(baseline, opt_base, images, batch.input_ids, batch.targets, tc)
        t_base = time.perf_counter() - t0

        step_time = {"baseline": t_base}
        losses["baseline"].append(loss_base)
        for name, (model, opt) in arms.items():
            t0 = time.perf_counter()
            step_batch = to_device(train_data.batch(pair_idx), cfg, "cpu")
            losses[name].append(train_step(model, opt, None, step_batch, tc, precision, "cpu", step))
            step_time[name] = time.perf_counter() - t0
            first_step_s.setdefault(name, step_time[name])  # the compiled arm's includes compiling

        if step >= args.warmup_steps:
            for name in times:
                times[name].append(step_time[name])
                # Each arm's own work: the baseline's head also runs on padding positions.
                flops[name] += training_flops(flop_model, step_batch, loss_only=name != "baseline")

    held_out = [to_device(b, cfg, "cpu") for b, _ in zip(dev_data.epoch(args.batch_size, seed=None), range(4))]
    ours.eval()
    baseline.eval()
    dev_loss = {
        "picovlm": held_out_loss(lambda x, ids: ours(x, ids)[0], held_out),
        "baseline": held_out_loss(lambda x, ids: baseline(baseline.vis_enc(x), ids)[:, baseline.n_vis:], held_out),
    }
    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    samples = args.steps * args.batch_size
    rate = {name: samples / sum(t) for name, t in times.items()}
    # Per-step medians too: a burst of other work on this machine inflates a few steps of either arm.
    median_rate = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    gflops = {name: flops[name] / sum(times[name]) / 1e9 for name in times}
    used = {name: "fp32" if name == "baseline" else precision for name in times}
    print(json.dumps({
        "benchmark": "train_throughput", "model": "supravl-nano", "data": str(data_dir),
        "batch_size": args.batch_size, "timed_steps": args.steps, "threads": torch.get_num_threads(),
        "precision": used,
        "samples_per_s": rate,
        "speedup": rate["picovlm"] / rate["baseline"],
        **({"speedup_compiled": rate["picovlm_compiled"] / rate["baseline"],
            "compile_first_step_s": first_step_s["picovlm_compiled"],
            "uncompiled_first_step_s": first_step_s["picovlm"]} if args.compile else {}),
        "samples_per_s_median_step": median_rate,
        "speedup_median_step": median_rate["picovlm"] / median_rate["baseline"],
        "train_loss_last_step": {k: v[-1] for k, v in losses.items()},
        "held_out_loss_after_training": dev_loss,
        "held_out_loss_rel_diff": abs(dev_loss["picovlm"] - dev_loss["baseline"]) / dev_loss["baseline"],
        "achieved_gflops": gflops,
        "matmul_peak_gflops": peaks,
        "fraction_of_peak": {name: gflops[name] / peaks[used[name]] for name in gflops},
    }, indent=2))


if __name__ == "__main__":
    main()
