"""What test-time views cost: the same images decoded, in one process, alternating, from one view
(the image), two (and its mirror: `--mirror`) and four (and the centre crop of each:
`--mirror --center-crop SHARE`), with one decoding strategy. Prints JSON: median seconds of each
and the ratio to one view.

    python -m benchmarks.views_cost --model runs/flickr8k/best [--data DIR] [--images 100]
        [--strategy mbr --beam-width 8 --mbr-temperature 4] [--center-crop 0.8]

Without --strategy, the checkpoint's own decoding with its views taken out (pico-mobilenet: mbr
over 8 beams at T = 4). Every view is one more row per beam in each decoding step, and one more
pass of the vision encoder per image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import picovlm
from benchmarks.caption_speed import decode_in_rounds
from picovlm.data.flickr8k import load_split
from picovlm.data.prepare import default_data_dir
from picovlm.generate import preprocess, resolve_generation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a supravl checkpoint folder")
    p.add_argument("--data", default=None, help="dataset folder for images (default: built-in shapes, dev)")
    p.add_argument("--images", type=int, default=100, help="dev images, decoded as one batch")
    p.add_argument("--strategy", default=None, help="default: the checkpoint's own decoding")
    p.add_argument("--beam-width", type=int, default=None)
    p.add_argument("--mbr-temperature", type=float, default=None)
    p.add_argument("--center-crop", type=float, default=0.8, help="share of the side the crop views keep")
    p.add_argument("--rounds", type=int, default=3, help="alternating timings of each")
    args = p.parse_args()

    model = picovlm.load(args.model)
    data = load_split(args.data or default_data_dir(), "dev")
    pixels = preprocess([data.image_dir / n for n in data.names[:args.images]], model)
    chosen = resolve_generation(model, args.strategy, beam_width=args.beam_width, mbr_temperature=args.mbr_temperature)
    one = dataclasses.replace(chosen, mirror=False, center_crop=None)
    arms = {"1": one, "2": dataclasses.replace(one, mirror=True),
            "4": dataclasses.replace(one, mirror=True, center_crop=args.center_crop)}
    median, _ = decode_in_rounds(model, pixels, arms, args.rounds)
    print(json.dumps({
        "benchmark": "views_cost", "model": args.model, "threads": torch.get_num_threads(),
        "images": len(pixels), "generation": dataclasses.asdict(one), "center_crop": args.center_crop,
        "seconds_median": {f"{n}_views": s for n, s in median.items()},
        "over_one_view": {f"{n}_views": s / median["1"] for n, s in median.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
