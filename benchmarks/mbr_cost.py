"""What `--strategy mbr` costs over the beam search it runs: both decode the same images, in one
process, alternating, with the same beam width; mbr adds only the pick among each image's beams.
Also reports how often the pick differs from the most probable beam. Prints JSON.

    python benchmarks/mbr_cost.py --model runs/flickr8k/best [--data DIR] [--images 200] [--width 8]
        [--mbr-temperature T | --mbr-neighbours K] [--mirror]

--mbr-neighbours K times the pick against the K nearest training images' captions, the look-up
included (the checkpoint needs its index: picovlm index).

--mirror gives both arms the image and its mirror (pico-mobilenet's stored decoding is mbr-8 with
--mirror and T = 4): the beam search then decodes two views per image, the pick is unchanged.
"""

from __future__ import annotations

import argparse
import json

import torch

import picovlm
from benchmarks.caption_speed import decode_in_rounds
from picovlm.data.flickr8k import load_split
from picovlm.data.prepare import default_data_dir
from picovlm.generate import GenerationConfig, preprocess


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a supravl checkpoint folder")
    p.add_argument("--data", default=None, help="dataset folder for images (default: built-in shapes, dev)")
    p.add_argument("--images", type=int, default=200, help="dev images, decoded as one batch")
    p.add_argument("--width", type=int, default=8, help="beam width of both")
    p.add_argument("--rounds", type=int, default=3, help="alternating timings of each")
    p.add_argument("--mbr-temperature", type=float, default=None,
                   help="mbr's pick by expected BLEU under the beams' probabilities (default: consensus)")
    p.add_argument("--mbr-neighbours", type=int, default=None, metavar="K",
                   help="mbr's pick against the captions of the K nearest training images (needs the index)")
    p.add_argument("--mirror", action="store_true", help="both arms read each image and its mirror")
    args = p.parse_args()

    model = picovlm.load(args.model)
    data = load_split(args.data or default_data_dir(), "dev")
    pixels = preprocess([data.image_dir / n for n in data.names[:args.images]], model)
    configs = {"beam": GenerationConfig(strategy="beam", beam_width=args.width, mirror=args.mirror),
               "mbr": GenerationConfig(strategy="mbr", beam_width=args.width, mirror=args.mirror,
                                       mbr_temperature=args.mbr_temperature, mbr_neighbours=args.mbr_neighbours)}
    median, captions = decode_in_rounds(model, pixels, configs, args.rounds)
    beam_s, mbr_s = median["beam"], median["mbr"]
    print(json.dumps({
        "benchmark": "mbr_cost", "model": args.model, "threads": torch.get_num_threads(),
        "images": len(pixels), "beam_width": args.width, "mirror": args.mirror,
        "mbr_temperature": args.mbr_temperature, "mbr_neighbours": args.mbr_neighbours,
        "beam_s_median": beam_s, "mbr_s_median": mbr_s, "mbr_over_beam": mbr_s / beam_s,
        "picked_another_beam": sum(a != b for a, b in zip(captions["beam"], captions["mbr"])) / len(pixels),
    }, indent=2))


if __name__ == "__main__":
    main()
