"""The `picovlm` command. Each sub-command is a thin shell over a Python function:

    picovlm demo                      picovlm.demo.run_demo
    picovlm train --preset P ...      picovlm.train.train
    picovlm scst --model DIR ...      picovlm.scst.self_critical
    picovlm caption IMG --model DIR   picovlm.load(DIR).caption(...)
    picovlm eval --model DIR --data D picovlm.evaluate.evaluate_captions
    picovlm compare EVAL_A EVAL_B     picovlm.significance.compare_evals
    picovlm explain IMG --model DIR   picovlm.explain.explain + draw_explanation
    picovlm serve --model DIR         picovlm.serve.serve
    picovlm sweep GRID.yaml           picovlm.sweep.run_sweep
    picovlm info PRESET               SupraVL(cfg).param_counts()
    picovlm data make-shapes DIR      picovlm.data.shapes.make_shapes_dataset
    picovlm data make-shards D OUT    picovlm.data.shards.write_shards
    picovlm data make-vqa OUT         picovlm.data.cauldron.write_shapes_vqa
    picovlm data build-cauldron ...   picovlm.data.cauldron.build_cauldron
    picovlm index --model DIR --data  picovlm.neighbours.add_index
    picovlm push-to-hub DIR REPO      picovlm.hub.push_to_hub
    picovlm eval-mc --model DIR       picovlm.mmstar.evaluate_multiple_choice
    picovlm measure-memory --preset P picovlm.memory.measure_memory

User mistakes (`UserError`) print as one line, `picovlm: error: ...`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from picovlm.config import PRESETS, SELECT_ON, TrainConfig, get_preset, parse_overrides, preset_train_config
from picovlm.errors import UserError
from picovlm.generate import STRATEGIES


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    # Defaults are None, "not given": the checkpoint's own decoding (its generation_config.json) when
    # no --strategy is named, else GenerationConfig's defaults (picovlm.generate.resolve_generation).
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="default: the checkpoint's own decoding (generation_config.json), else beam")
    p.add_argument("--beam-width", type=int, default=None, help="beams of beam and mbr (default: 3)")
    p.add_argument("--length-penalty", type=float, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for the sampling strategies")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="also read each image mirrored; decode from the two views' averaged log-probs")
    p.add_argument("--center-crop", type=float, default=None, metavar="SHARE",
                   help="also read the centre crop of each view covering SHARE of its side (e.g. 0.8), "
                        "enlarged back to the input size, and average it in like the mirror")
    p.add_argument("--mbr-temperature", type=float, default=None, metavar="T",
                   help="mbr: pick the beam with the highest expected BLEU-4 against the beams weighted by "
                        "softmax(log-prob / T), itself included (default: the beam most like the others)")
    p.add_argument("--mbr-neighbours", type=int, default=None, metavar="K",
                   help="mbr: pick the beam with the highest BLEU-4 against the captions of each of the K training "
                        "images nearest in the model's visual features (needs its index: picovlm index)")


def _generation_kwargs(args: argparse.Namespace) -> dict:
    """The generation settings given on the command line (None: not given)."""
    return {"beam_width": args.beam_width, "length_penalty": args.length_penalty,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "seed": args.seed, "max_new_tokens": args.max_new_tokens, "mirror": args.mirror,
            "center_crop": args.center_crop, "mbr_temperature": args.mbr_temperature,
            "mbr_neighbours": args.mbr_neighbours}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picovlm", description="Tiny vision-language models in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train on the built-in shapes dataset for a few minutes, then caption")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--max-steps", type=int, default=1500)
    p.add_argument("--n-images", type=int, default=3000)

    p = sub.add_parser("train", help="train a model")
    p.add_argument("--preset", default="supravl-nano", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--data", default=None, help="dataset folder (Flickr8k layout), a folder of WebDataset .tar "
                   "shards, or hf:NAME (streamed with `datasets`); default: built-in shapes")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics, plots")
    # Train settings default to None, "not given": the preset's recipe (PRESET_TRAIN) then
    # TrainConfig's defaults fill them in; see preset_train_config.
    p.add_argument("--epochs", type=int, default=None, help=f"default: the preset's, else {TrainConfig.epochs}")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help=f"default: {TrainConfig.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"default: the preset's, else {TrainConfig.lr}")
    p.add_argument("--min-lr", type=float, default=None, help=f"default: {TrainConfig.min_lr}")
    p.add_argument("--warmup-steps", type=int, default=None, help=f"default: {TrainConfig.warmup_steps}")
    p.add_argument("--label-smoothing", type=float, default=None, help="default: the preset's, else 0")
    p.add_argument("--word-loss", type=float, default=None, metavar="WEIGHT", help="add WEIGHT x a bag-of-words "
                   "loss on the visual tokens (captioners on caption folders; default: the preset's, else 0)")
    for part in ("vision", "projector", "language"):
        p.add_argument(f"--lr-{part}", type=float, default=None, help=f"peak learning rate of the {part} part "
                       f"(default: --lr)")
    p.add_argument("--freeze", action="append", default=None, choices=["vision", "projector", "language"],
                   help="do not train this part (repeatable)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="validate and keep best/ with an "
                   "exponential moving average of the weights, e.g. 0.999 (default: the preset's, else off)")
    p.add_argument("--select-on", default=None, choices=SELECT_ON, help="what best/ keeps: the epoch with the lowest "
                   "dev loss, or the highest CIDEr-D of its greedy dev captions (captioners; default: loss)")
    p.add_argument("--grad-accum", type=int, default=None, help="split each batch into N micro-batches "
                   "(same result, less memory; default 1)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"], help="default: auto")
    p.add_argument("--seed", type=int, default=None, help=f"default: {TrainConfig.seed}")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random resized crop, colour jitter, safe flips (default: the preset's, else off)")
    p.add_argument("--augment-scale", type=float, default=None, metavar="SCALE",
                   help="with --augment: the smallest share of an image's area a random crop covers "
                   f"(default: {TrainConfig.augment_scale})")
    p.add_argument("--mirror-features", action=argparse.BooleanOptionalAction, default=None,
                   help="with a frozen MobileNetV2: also cache the mirrored images' features and train on them "
                   "for half the captions without left/right (default: the preset's, else off)")
    p.add_argument("--feature-crop", type=float, default=None, metavar="SCALE",
                   help="with a frozen MobileNetV2: train on random crops of its cached feature maps covering "
                   "at least this share of each map, e.g. 0.6 (default: the preset's, else 1: no crops)")
    p.add_argument("--save-every", type=int, default=None, help="also save last/ every N steps")
    p.add_argument("--log-every", type=int, default=None, help="metrics.jsonl line every N steps")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (a cold compile "
                   "first)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes decoding a streamed source (default 0: in this process)")
    _add_scst_args(p, "after cross-entropy training, fine-tune out/best with SCST into out/scst for N epochs "
                      "(default: the preset's, else 0)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("scst", help="fine-tune a trained captioner on CIDEr-D (self-critical sequence training)")
    p.add_argument("--model", required=True, help="checkpoint folder to start from (e.g. runs/x/best)")
    p.add_argument("--data", required=True, help="dataset folder (Flickr8k layout) it was trained on")
    p.add_argument("--out", required=True, help="run folder: best/, last/, metrics.jsonl")
    _add_scst_args(p, f"epochs (default {SCST_EPOCHS})")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    p.add_argument("--resume", action="store_true", help="continue the SCST run in --out")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("caption", help="caption images with a trained model")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    _add_generation_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="BLEU/METEOR/ROUGE-L/CIDEr and diversity of captions on a split")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="dataset folder (Flickr8k layout)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--out", default=None, help="folder for eval.json, report.md and examples.png")
    _add_generation_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("compare", help="is B's score really higher than A's? paired bootstrap of two "
                       "picovlm eval --out results of the same images")
    p.add_argument("a", help="eval.json, or the folder picovlm eval --out wrote it to")
    p.add_argument("b", help="the same for the other system")
    p.add_argument("--resamples", type=int, default=1000, help="resamples of the images (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("explain", help="per-word attention maps over the image, as a PNG strip")
    p.add_argument("image")
    p.add_argument("--model", required=True)
    p.add_argument("--out", default="maps.png")
    p.add_argument("--per-layer", action="store_true", help="add one row per decoder layer")
    _add_generation_args(p)
    p.set_defaults(strategy="greedy")

    p = sub.add_parser("serve", help="web demo and JSON API (POST /caption, POST /explain, GET /health)")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)

    p = sub.add_parser("sweep", help="train a grid of configurations; tables and plots to compare them")
    p.add_argument("grid", help="YAML file: preset, data, train settings, grid of config values")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--log", choices=["tensorboard"], default=None, help="also log each run (off by default)")

    p = sub.add_parser("info", help="architecture and parameter counts of a preset")
    p.add_argument("preset")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("make-shapes", help="write the built-in shapes dataset to a folder")
    q.add_argument("out")
    q.add_argument("--n-images", type=int, default=3000)
    q.add_argument("--seed", type=int, default=0)
    q = data_sub.add_parser("make-shards", help="write a dataset folder as WebDataset .tar shards (train/, dev/)")
    q.add_argument("data", help="dataset folder (Flickr8k layout)")
    q.add_argument("out")
    q.add_argument("--per-shard", type=int, default=1000, help="(image, caption) samples per shard")
    q = data_sub.add_parser("make-vqa", help="write the built-in VQA set (Cauldron format) and a multiple-choice "
                            "set (MMStar format, in OUT/mmstar)")
    q.add_argument("out")
    q.add_argument("--n-train", type=int, default=2000)
    q.add_argument("--n-val", type=int, default=200)
    q.add_argument("--n-multiple-choice", type=int, default=200)
    q = data_sub.add_parser("build-cauldron", help="a Cauldron-format dataset from a folder of images and a JSONL "
                            "file of {image, question, answer} or {images, texts} lines")
    q.add_argument("images", help="folder the JSONL's image names are relative to")
    q.add_argument("jsonl")
    q.add_argument("out")
    q.add_argument("--val-fraction", type=float, default=0.0, help="hold out this share as the validation split")
    q.add_argument("--source", default="custom", help="the `source` of every turn")

    p = sub.add_parser("index", help="add the index of training captions that --mbr-neighbours reads to a "
                                     "captioner's checkpoint folder (neighbours.safetensors)")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--data", required=True, help="dataset folder (Flickr8k layout)")
    p.add_argument("--split", default="train", choices=["train", "dev", "test"])

    p = sub.add_parser("push-to-hub", help="upload a checkpoint folder to the Hugging Face Hub")
    p.add_argument("model")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")

    p = sub.add_parser("eval-mc", help="MMStar-style multiple-choice accuracy of a NanoVLM, by letter likelihood "
                       "and by greedy generation, overall and per category")
    p.add_argument("--model", required=True, help="NanoVLM checkpoint folder or Hub repo id (read by picovlm.load)")
    p.add_argument("--data", default="Lin-Chen/MMStar", help="folder (e.g. OUT/mmstar from `picovlm data make-vqa "
                   "OUT`) or Hub dataset in MMStar's format")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ways", default="likelihood,generate", help="likelihood, generate, or both (comma-separated)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per answer (generate way)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--out", default=None, help="also write the full report (every question's prediction) as JSON")
    p.add_argument("--json", action="store_true", help="print the report without the per-question predictions")

    p = sub.add_parser("measure-memory", help="peak memory of a training step and of generation per batch size "
                       "(random weights; a fresh process per measurement)")
    p.add_argument("--preset", default="supravl-nano", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--batch-sizes", default="1,2,4,8", help="comma-separated, e.g. 1,8,32,64")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model config field")
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (max_memory_allocated)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: autocast for the training step, bf16 weights for generation")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="text tokens per sample (default: lm_max_text_len for supravl, 32 for nanovlm)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per sample (greedy, KV cache)")
    p.add_argument("--json", action="store_true")
    return parser


SCST_EPOCHS = 2  # picovlm scst's default; `train --scst-epochs` defaults to the preset's


def _add_scst_args(p: argparse.ArgumentParser, epochs_help: str) -> None:
    p.add_argument("--scst-epochs", type=int, default=None, help=epochs_help)
    p.add_argument("--scst-lr", type=float, default=None, help=f"SCST's peak learning rate (default: the "
                   f"preset's, else {TrainConfig.scst_lr})")
    p.add_argument("--scst-samples", type=int, default=None, help=f"captions sampled per image (default "
                   f"{TrainConfig.scst_samples})")
    p.add_argument("--scst-images", type=int, default=None, help=f"images per SCST step (default "
                   f"{TrainConfig.scst_images})")


def _scst_settings(args: argparse.Namespace) -> dict[str, Any]:
    return dict(scst_epochs=args.scst_epochs, scst_lr=args.scst_lr, scst_samples=args.scst_samples,
                scst_images=args.scst_images)


def cmd_train(args: argparse.Namespace) -> None:
    from picovlm.train import train

    cfg = get_preset(args.preset).with_overrides(parse_overrides(args.set))
    tc = preset_train_config(args.preset, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                             label_smoothing=args.label_smoothing, precision=args.precision, seed=args.seed,
                             augment=args.augment, augment_scale=args.augment_scale, save_every=args.save_every,
                             log_every=args.log_every,
                             num_workers=args.num_workers, compile=args.compile, lr_vision=args.lr_vision,
                             lr_projector=args.lr_projector, lr_language=args.lr_language,
                             freeze=tuple(args.freeze) if args.freeze else None, grad_accum_steps=args.grad_accum,
                             ema_decay=args.ema, mirror_features=args.mirror_features, feature_crop=args.feature_crop,
                             select_on=args.select_on, word_loss=args.word_loss,
                             **_scst_settings(args))
    summary = train(cfg, tc, args.out, data_dir=args.data, resume=args.resume, device=args.device,
                    progress_bar=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(json.dumps(summary, indent=2))


def cmd_scst(args: argparse.Namespace) -> None:
    from picovlm.scst import self_critical

    settings = {k: v for k, v in _scst_settings(args).items() if v is not None}
    tc = TrainConfig(**{"scst_epochs": SCST_EPOCHS, **settings}, precision=args.precision, seed=args.seed,
                     log_every=args.log_every)
    summary = self_critical(args.model, args.data, args.out, tc, resume=args.resume, device=args.device,
                            progress_bar=not args.no_progress)
    print(json.dumps(summary, indent=2))


def cmd_caption(args: argparse.Namespace) -> None:
    import picovlm

    model = picovlm.load(args.model)
    captions = model.caption(args.images, strategy=args.strategy, **_generation_kwargs(args))
    if args.json:
        print(json.dumps([{"image": i, "caption": c} for i, c in zip(args.images, captions)], indent=2))
    else:
        for image, caption in zip(args.images, captions):
            print(f"{image}\t{caption}")


def cmd_eval(args: argparse.Namespace) -> None:
    import picovlm
    from picovlm.evaluate import evaluate_captions, write_report
    from picovlm.generate import GenerationConfig

    model = picovlm.load(args.model)
    result = evaluate_captions(model, args.data, args.split, args.strategy, args.limit, **_generation_kwargs(args))
    if args.out:
        write_report(result, args.out)
    summary = {k: result[k] for k in ("split", "strategy", "generation", "n_images", "metrics", "intervals",
                                      "diversity")}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    gen = GenerationConfig(strategy=result["strategy"], **result["generation"])
    settings = "".join(f", {k} {v}" for k, v in gen.in_effect().items())
    print(f"{result['n_images']} {args.split} images, {result['strategy']} decoding{settings}")
    print("  " + "  ".join(f"{k} {100 * v:.1f}" for k, v in result["metrics"].items()))
    print("  95 % intervals over resampled images: "
          + "  ".join(f"{k} {100 * lo:.1f}-{100 * hi:.1f}" for k, (lo, hi) in result["intervals"].items()))
    print("  " + "  ".join(f"{k} {v:.3g}" for k, v in result["diversity"].items()))


def cmd_compare(args: argparse.Namespace) -> None:
    from picovlm.significance import compare_evals

    if args.resamples < 1:
        raise UserError("--resamples must be at least 1")
    result = compare_evals(args.a, args.b, args.resamples, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"B ({args.b}) against A ({args.a}): {result['n_images']} images, paired bootstrap, "
          f"{args.resamples} resamples; scores x 100")
    print(f"{'metric':8s} {'A':>6s} {'B':>6s} {'B - A':>6s}  {'95 % interval of B - A':>22s}  B ahead in")
    for name, m in result["metrics"].items():
        low, high = m["interval"]
        print(f"{name:8s} {100 * m['a']:6.2f} {100 * m['b']:6.2f} {100 * m['difference']:+6.2f}  "
              f"{f'{100 * low:+.2f} to {100 * high:+.2f}':>22s}  {100 * m['b_ahead']:.1f} % of resamples")


def cmd_explain(args: argparse.Namespace) -> None:
    import picovlm
    from picovlm.explain import draw_explanation, explain

    model = picovlm.load(args.model)
    expl = explain(model, args.image, strategy=args.strategy, **_generation_kwargs(args))
    out = draw_explanation(expl, args.out, per_layer=args.per_layer)
    print(f"{expl.caption}\nattention maps: {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from picovlm.serve import serve

    serve(args.model, args.host, args.port)


def cmd_sweep(args: argparse.Namespace) -> None:
    from picovlm.sweep import run_sweep

    rows = run_sweep(args.grid, args.out, log=args.log)
    print((Path(args.out) / "sweep.md").read_text())
    print(f"{len(rows)} runs; tables and plots in {args.out}")


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from picovlm.models import build_model

    cfg = get_preset(args.preset).with_overrides(parse_overrides(args.set))
    with torch.device("meta"):  # shapes only: counting needs no memory or initialisation
        counts = build_model(cfg).param_counts()
    report = {"preset": args.preset, "family": cfg.family, "config": cfg.to_dict(), **counts}
    if args.json:
        print(json.dumps(report, indent=2))
    elif cfg.family == "nanovlm":
        _print_nanovlm_info(args.preset, cfg, counts)
    else:
        _print_supravl_info(args.preset, cfg, counts)


def _print_supravl_info(preset: str, cfg: Any, counts: dict[str, Any]) -> None:
    print(f"{preset}: {cfg.n_vis_tokens} visual + {cfg.lm_max_text_len} text positions, {cfg.img_size}px input")
    for name, n in counts["components"].items():
        note = " (tied to tok_emb)" if name == "lm_head" and counts["lm_head_tied"] else ""
        print(f"  {name:<8} {n:>12,}{note}")
    print(f"  {'total':<8} {counts['params_unique']:>12,} unique parameters")
    print(f"  {'':<8} {counts['params_with_tied_head']:>12,} counting the tied lm_head twice")
    if counts["frozen"]:
        print(f"  {'':<8} {counts['trainable']:>12,} trainable, {counts['frozen']:,} frozen (pretrained backbone)")


def _print_nanovlm_info(preset: str, cfg: Any, counts: dict[str, Any]) -> None:
    grid = cfg.vit_img_size // cfg.vit_patch_size
    tokens = (grid // cfg.mp_pixel_shuffle_factor) ** 2
    print(f"{preset}: {cfg.vit_img_size}px input, {grid}x{grid} patches -> {tokens} image tokens per image")
    tied = " (lm_head tied to the embedding, counted once)" if counts["lm_head_tied"] else ""
    for name in ("vit_params", "mp_params", "lm_params"):
        print(f"  {name:<10} {counts[name]:>13,}{tied if name == 'lm_params' else ''}")
    print(f"  {'total':<10} {counts['params_unique']:>13,} unique parameters")


def cmd_demo(args: argparse.Namespace) -> None:
    from picovlm.demo import run_demo

    run_demo(Path(args.out), max_steps=args.max_steps, n_images=args.n_images)


def cmd_data(args: argparse.Namespace) -> None:
    if args.data_command == "make-vqa":
        from picovlm.data.cauldron import write_shapes_vqa

        write_shapes_vqa(args.out, args.n_train, args.n_val, args.n_multiple_choice)
        print(f"wrote {args.n_train} train / {args.n_val} validation VQA images and {args.n_multiple_choice} "
              f"multiple-choice questions to {args.out}")
        return
    if args.data_command == "build-cauldron":
        from picovlm.data.cauldron import build_cauldron

        counts = build_cauldron(args.images, args.jsonl, args.out, args.source, args.val_fraction)
        print(f"wrote {counts['train']} train and {counts['validation']} validation examples to {args.out}")
        return
    if args.data_command == "make-shards":
        from picovlm.data.shards import write_shards

        counts = write_shards(args.data, args.out, per_shard=args.per_shard)
        print(f"wrote {counts['train']} train and {counts['dev']} dev shards to {args.out}")
        return
    from picovlm.data.shapes import make_shapes_dataset

    out = make_shapes_dataset(args.out, n_images=args.n_images, seed=args.seed)
    print(f"wrote {args.n_images} images with captions to {out}")


def cmd_index(args: argparse.Namespace) -> None:
    from picovlm.neighbours import add_index

    path = add_index(args.model, args.data, args.split)
    print(f"wrote {path}")


def cmd_push(args: argparse.Namespace) -> None:
    from picovlm.hub import push_to_hub

    print(push_to_hub(args.model, args.repo_id, private=args.private))


def cmd_eval_mc(args: argparse.Namespace) -> None:
    import picovlm
    from picovlm.mmstar import evaluate_multiple_choice, format_report, load_multiple_choice, require_nanovlm
    from picovlm.train import autodetect_device

    # picovlm.load must return a NanoVLM with .tokenizer (a tokenizers.Tokenizer holding <|image|>).
    model = require_nanovlm(picovlm.load(args.model, device=args.device or autodetect_device()))
    rows = load_multiple_choice(args.data, args.split)
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    report = evaluate_multiple_choice(model, rows, batch_size=args.batch_size, ways=args.ways.split(","),
                                      max_new_tokens=args.max_new_tokens, progress=not args.json)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k != "questions"}
    print(json.dumps(summary, indent=2) if args.json else format_report(report))


def cmd_measure_memory(args: argparse.Namespace) -> None:
    from picovlm.memory import format_table, measure_memory, parse_batch_sizes

    cfg = get_preset(args.preset).with_overrides(parse_overrides(args.set))
    report = measure_memory(cfg, parse_batch_sizes(args.batch_sizes), args.device, args.precision,
                            args.text_tokens, args.new_tokens, progress=not args.json)
    report = {"preset": args.preset, **report}
    print(json.dumps(report, indent=2) if args.json else format_table(report, args.preset))


COMMANDS = {"train": cmd_train, "scst": cmd_scst, "caption": cmd_caption, "eval": cmd_eval, "explain": cmd_explain,
            "serve": cmd_serve, "sweep": cmd_sweep, "info": cmd_info, "demo": cmd_demo, "data": cmd_data,
            "push-to-hub": cmd_push, "index": cmd_index, "measure-memory": cmd_measure_memory,
            "eval-mc": cmd_eval_mc, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"picovlm: warning: {msg}\n"
    try:
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"picovlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("picovlm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
