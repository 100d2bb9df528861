"""A NanoVLM trained on this CPU: SmolLM2-135M-Instruct (frozen) learns to see through a small ViT
and the projector, trained on the built-in VQA set. Prints JSON.

    python -m benchmarks.nanovlm_cpu_demo --out runs/nanovlm-demo [--steps 300] [--batch-size 8]

1. Writes the built-in VQA set (Cauldron train/validation) and its multiple-choice set (MMStar
   format), unless --data gives an existing one.
2. Builds the model: a small ViT (random) + pixel shuffle + SmolLM2-135M-Instruct from the
   offline GGUF (picovlm.pretrained_lm), the language model frozen.
3. Multiple-choice accuracy before training (letter likelihood and free generation).
4. `picovlm.train.train`: vision encoder and projector only, bf16 autocast where fast.
5. The same accuracy after, measured in a fresh process that loads the saved checkpoint in
   bfloat16, whose peak RSS is the inference memory reported.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from picovlm.config import TrainConfig, nanovlm_222m
from picovlm.data.cauldron import write_shapes_vqa
from picovlm.mmstar import evaluate_multiple_choice, load_multiple_choice
from picovlm.models.nanovlm import NanoVLM
from picovlm.train import train

# A small ViT: 64 px, 8 px patches -> 8x8 patches -> pixel shuffle 2 -> 16 image tokens per image.
SMALL_VIT = {"img_size": 64, "vit_img_size": 64, "vit_patch_size": 8, "vit_hidden_dim": 192, "vit_inter_dim": 768,
             "vit_n_heads": 3, "vit_n_blocks": 4, "mp_pixel_shuffle_factor": 2, "lm_max_text_len": 160}


def accuracy(report: dict) -> dict[str, float]:
    return {way: report[way]["accuracy"] for way in ("likelihood", "generate") if way in report}


def evaluate_checkpoint(folder: Path, mc_dir: Path, limit: int, dtype: str) -> dict:
    """Load a checkpoint and score it (run in a fresh process: its peak RSS is inference memory)."""
    import picovlm
    from picovlm.memory import reset_peak_rss

    reset_peak_rss()  # an exec'd child starts with its parent's peak on Linux: measure from here
    model = picovlm.load(str(folder), dtype=torch.bfloat16 if dtype == "bf16" else None)
    rows = load_multiple_choice(mc_dir)
    rows = rows.select(range(min(limit, len(rows))))
    report = evaluate_multiple_choice(model, rows, batch_size=8, progress=False)
    return {"accuracy": accuracy(report), "per_category": {w: report[w].get("per_category") for w in
                                                             ("likelihood", "generate")},
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS since reset_peak_rss: the kernel's VmHWM. (ru_maxrss would also
    count the parent's peak, which Linux hands to an exec'd child.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=None, help="a folder written by `picovlm data make-vqa` (default: make one)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-limit", type=int, default=200, help="multiple-choice questions scored")
    p.add_argument("--lm-weights", default="smollm2-135m-instruct", help='"" for a random decoder (tests)')
    p.add_argument("--n-train", type=int, default=2000, help="VQA training images to generate")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--eval-only", default=None, help=argparse.SUPPRESS)  # the fresh evaluation process
    args = p.parse_args()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "vqa"
    if args.eval_only:
        print(json.dumps(evaluate_checkpoint(Path(args.eval_only), data / "mmstar", args.eval_limit, "bf16")))
        return
    if not (data / "data").is_dir():
        write_shapes_vqa(data, n_train=args.n_train, n_val=200, n_multiple_choice=args.eval_limit)

    from picovlm.config import parse_overrides

    cfg = nanovlm_222m().with_overrides({**SMALL_VIT, "lm_weights": args.lm_weights, **parse_overrides(args.set)})
    torch.manual_seed(0)
    before_model = NanoVLM(cfg)
    before_model.tokenizer = before_model.load_pretrained_parts()
    if before_model.tokenizer is None:  # no pretrained language model (tests): the one training would make
        from picovlm.chat import IMAGE_TOKEN, train_chat_tokenizer
        from picovlm.data.cauldron import load_cauldron

        texts = (t[k] for row in load_cauldron(data) for t in row["texts"] for k in ("user", "assistant"))
        before_model.tokenizer = train_chat_tokenizer(texts, cfg.lm_vocab_size)
        cfg.image_token_id = before_model.tokenizer.token_to_id(IMAGE_TOKEN)
    rows = load_multiple_choice(data / "mmstar")
    rows = rows.select(range(min(args.eval_limit, len(rows))))
    before = evaluate_multiple_choice(before_model, rows, batch_size=8, progress=False)
    del before_model

    with torch.device("meta"):
        counts = NanoVLM(cfg).param_counts()
    params = {k: counts[k] for k in ("vit_params", "mp_params", "lm_params")}
    tc = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=20,
                     freeze=("language",), log_every=10, eval_max_batches=10)
    t0 = time.perf_counter()
    summary = train(cfg, tc, out / "run", data_dir=data, progress_bar=sys.stderr.isatty())
    train_s = time.perf_counter() - t0
    done = subprocess.run([sys.executable, "-m", "benchmarks.nanovlm_cpu_demo", "--out", str(out), "--data",
                           str(data), "--eval-limit", str(args.eval_limit), "--eval-only", str(out / "run" / "best")],
                          capture_output=True, text=True, check=True)
    after = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "benchmark": "nanovlm_cpu_demo", "threads": torch.get_num_threads(), "config": {
            **SMALL_VIT, "lm_weights": args.lm_weights, "frozen": "language"},
        "params": params,
        "steps": summary["steps"], "batch_size": args.batch_size, "train_wall_s": train_s,
        "train_samples_per_s": summary["samples_per_s"], "best_val_loss": summary["best_val_loss"],
        "multiple_choice_questions": len(rows),
        "accuracy_before": accuracy(before), "accuracy_after": after["accuracy"],
        "per_category_after": after["per_category"],
        "inference_peak_rss_mb_bf16": after["peak_rss_mb"],
    }, indent=2))


if __name__ == "__main__":
    main()
