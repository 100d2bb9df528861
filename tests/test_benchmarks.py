"""Every benchmark script runs (with small settings) and prints the JSON it promises."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from picovlm.data.flickr8k import load_split
from picovlm.neighbours import add_index

ROOT = Path(__file__).parent.parent


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=600)
    return json.loads(out.stdout)


def test_caption_speed(trained_run: Path, shapes_dir: Path) -> None:
    report = _run("benchmarks.caption_speed", "--model", str(trained_run / "best"), "--data", str(shapes_dir),
                  "--n-single", "2", "--batch", "4")
    assert report["identical_captions"] is True
    assert report["one_image"]["beam3"]["picovlm_ms_p50"] > 0 and report["batch_4"]["greedy"]["speedup"] > 0


def test_mbr_cost(trained_run: Path, shapes_dir: Path) -> None:
    report = _run("benchmarks.mbr_cost", "--model", str(trained_run / "best"), "--data", str(shapes_dir),
                  "--images", "4", "--width", "3", "--rounds", "1", "--mbr-temperature", "2", "--mirror")
    assert report["images"] == 4 and report["beam_width"] == 3 and report["mbr_temperature"] == 2.0
    assert report["mirror"] is True
    assert report["beam_s_median"] > 0 and report["mbr_over_beam"] > 0 and 0 <= report["picked_another_beam"] <= 1


def test_mbr_cost_with_neighbours(trained_run: Path, shapes_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(trained_run / "best", tmp_path / "m")
    add_index(tmp_path / "m", shapes_dir)
    report = _run("benchmarks.mbr_cost", "--model", str(tmp_path / "m"), "--data", str(shapes_dir),
                  "--images", "4", "--width", "3", "--rounds", "1", "--mbr-neighbours", "5")
    assert report["mbr_neighbours"] == 5 and report["mbr_temperature"] is None and report["mbr_over_beam"] > 0


def test_views_cost(trained_run: Path, shapes_dir: Path) -> None:
    report = _run("benchmarks.views_cost", "--model", str(trained_run / "best"), "--data", str(shapes_dir),
                  "--images", "4", "--strategy", "mbr", "--beam-width", "3", "--rounds", "1", "--center-crop", "0.7")
    assert report["images"] == 4 and report["center_crop"] == 0.7
    assert report["generation"]["strategy"] == "mbr" and report["generation"]["beam_width"] == 3
    assert not report["generation"]["mirror"] and report["generation"]["center_crop"] is None
    assert report["over_one_view"]["1_views"] == 1.0 and all(s > 0 for s in report["seconds_median"].values())


def test_caption_memory(trained_run: Path, shapes_dir: Path) -> None:
    image = str(load_split(shapes_dir, "dev").image_dir / load_split(shapes_dir, "dev").names[0])
    report = _run("benchmarks.caption_memory", "--model", str(trained_run / "best"), image)
    assert report["picovlm_caption_peak_rss_mb"] > report["import_torch_only_peak_rss_mb"] > 50


def test_train_precision() -> None:
    report = _run("benchmarks.train_precision", "--rounds", "1", "--steps", "2", "--batch-size", "8")
    assert set(report["best_samples_per_s"]) == {"fp32", "bf16"} and report["bf16_over_fp32"] > 0


def test_train_throughput(shapes_dir: Path) -> None:
    report = _run("benchmarks.train_throughput", "--data", str(shapes_dir), "--steps", "3", "--batch-size", "16",
                  "--warmup-steps", "1")
    # Same weights, same batches, same pixels: the two arms must have learned the same thing.
    assert report["held_out_loss_rel_diff"] < 0.01
    assert report["speedup"] > 0 and 0 < report["fraction_of_peak"]["picovlm"] < 1.5


def test_nanovlm_cpu_demo(tmp_path: Path) -> None:
    tiny = ["img_size=32", "vit_img_size=32", "vit_patch_size=8", "vit_hidden_dim=32", "vit_inter_dim=64",
            "vit_n_heads=2", "vit_n_blocks=1", "lm_hidden_dim=32", "lm_inter_dim=64", "lm_n_heads=4",
            "lm_n_kv_heads=2", "lm_n_blocks=1", "lm_vocab_size=300", "lm_max_text_len=96"]
    args = ["benchmarks.nanovlm_cpu_demo", "--out", str(tmp_path), "--steps", "3", "--batch-size", "4",
            "--eval-limit", "8", "--n-train", "16", "--lm-weights", ""]
    for item in tiny:
        args += ["--set", item]
    report = _run(*args)
    assert report["steps"] == 3 and report["multiple_choice_questions"] == 8
    assert set(report["accuracy_after"]) == {"likelihood", "generate"} and report["inference_peak_rss_mb_bf16"] > 50


def test_feature_crop_cost() -> None:
    report = _run("benchmarks.feature_crop_cost", "--steps", "1", "--batch-size", "4")
    assert (report["map"], report["grid"], report["batch_size"]) == ("10x10", "7x7", 4)
    assert report["cached_grid_ms_median"] > 0 and report["crop_and_pool_only_ms_median"] > 0
    assert report["cropped_ms_median"] > report["crop_and_pool_only_ms_median"]
    assert report["cropped_over_cached"] > 0
