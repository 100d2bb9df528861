"""`picovlm train` under torchrun: two gloo processes follow the one-process loss trajectory, from
pixels, from streamed shards and from cached backbone features, and for a NanoVLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from picovlm.config import TrainConfig
from picovlm.data.shards import write_shards
from picovlm.distributed import DistInfo
from picovlm.train import train
from tests.conftest import tiny_config
from tests.test_features import saved_backbone, tiny_mobilenet

TINY = ["img_size=32", "cnn_channels=[4,8,16]", "cnn_grid=2", "lm_hidden_dim=32", "lm_n_heads=2", "lm_n_blocks=2",
        "lm_inter_dim=64", "lm_vocab_size=300", "lm_max_text_len=20"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


def _torchrun(cmd: list[str], **env_vars: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_rows_split_a_batch_exactly() -> None:
    for world in (1, 2, 3, 4):
        for n in range(world, 12):
            rows = [DistInfo(r, world).rows(n) for r in range(world)]
            assert [i for s in rows for i in range(n)[s]] == list(range(n))
            assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


def test_two_gloo_processes_match_one(tmp_path: Path, shapes_dir: Path) -> None:
    steps, batch = 8, 16
    one = tmp_path / "one"
    tc = TrainConfig(epochs=1, max_steps=steps, batch_size=batch, lr=3e-3, warmup_steps=2, precision="fp32",
                     log_every=1)
    cfg = tiny_config().with_overrides({})
    train(cfg, tc, one, data_dir=shapes_dir, progress_bar=False)

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "picovlm.cli", "train", "--data", str(shapes_dir), "--out", str(two), "--epochs", "1",
           "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "3e-3", "--warmup-steps", "2",
           "--precision", "fp32", "--log-every", "1", "--no-progress", "--device", "cpu"]
    for item in TINY:
        cmd += ["--set", item]
    summary = _torchrun(cmd)
    assert summary["processes"] == 2 and summary["steps"] == steps

    single, double = _losses(one), _losses(two)
    assert len(single) == len(double) == steps
    # Same global batches and targets; only BatchNorm's statistics differ (per process on CPU).
    for a, b in zip(single, double):
        assert abs(a - b) / a < 0.005, (single, double)
    assert double[-1] < double[0] - 0.2  # and it learns
    assert (two / "best" / "model.safetensors").is_file() and (two / "loss.png").is_file()


def test_two_gloo_processes_stream_their_own_shards(tmp_path: Path, shapes_dir: Path) -> None:
    write_shards(shapes_dir, tmp_path / "shards", per_shard=40)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "picovlm.cli", "train", "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"),
           "--max-steps", "30", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "3", "--log-every", "1",
           "--no-progress", "--device", "cpu", "--num-workers", "1"]
    for item in TINY:
        cmd += ["--set", item]
    summary = _torchrun(cmd)
    losses = _losses(tmp_path / "run")
    # 240 train pairs, 16 a step: the stream ends (and is reshuffled) about every 15 steps.
    assert summary["processes"] == 2 and summary["steps"] == 30 and losses[-1] < losses[0] - 1.0


def test_two_gloo_processes_train_on_cached_mirrored_features(tmp_path: Path, shapes_dir: Path) -> None:
    """A frozen MobileNetV2: one process caches the features (plain and mirrored), both train on them,
    and each global batch gets the same features, mirrored or not, as in one process."""
    backbone = saved_backbone(tiny_mobilenet(), tmp_path / "backbone.pth")  # random, not all-zero features
    fields = dict(vision_type="mobilenet_v2", img_size=64, cnn_grid=2, vision_weights=str(backbone))
    steps, batch = 6, 16
    tc = TrainConfig(epochs=1, max_steps=steps, batch_size=batch, lr=3e-3, warmup_steps=2, precision="fp32",
                     log_every=1, mirror_features=True)
    one = tmp_path / "one"
    train(tiny_config(**fields), tc, one, data_dir=shapes_dir, progress_bar=False)

    two, cache = tmp_path / "two", tmp_path / "cache-two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "picovlm.cli", "train", "--data", str(shapes_dir), "--out", str(two), "--epochs", "1",
           "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "3e-3", "--warmup-steps", "2",
           "--precision", "fp32", "--log-every", "1", "--no-progress", "--device", "cpu", "--mirror-features"]
    for item in TINY + [f"{k}={v}" for k, v in fields.items()]:
        cmd += ["--set", item]
    summary = _torchrun(cmd, PICOVLM_CACHE=str(cache))
    assert summary["processes"] == 2 and summary["steps"] == steps
    assert len(list(cache.glob("features-*.npy"))) == 3  # train, train mirrored, dev
    single, double = _losses(one), _losses(two)
    assert len(single) == len(double) == steps
    for a, b in zip(single, double):  # no BatchNorm is trained here, so only summation order differs
        assert abs(a - b) / a < 1e-4, (single, double)
    weights = [load_file(run / "last" / "model.safetensors") for run in (one, two)]
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5, msg=name)


def test_two_gloo_processes_train_a_nanovlm_as_one_does(tmp_path: Path) -> None:
    """The nanoVLM family under torchrun: conversations of different lengths split over two processes
    give the one-process loss and weights (no BatchNorm here, so only summation order differs)."""
    from picovlm.data.cauldron import write_shapes_vqa
    from tests.test_nanovlm import tiny_nanovlm

    vqa = write_shapes_vqa(tmp_path / "vqa", n_train=64, n_val=16, n_multiple_choice=8, size=32)
    fields = dict(lm_vocab_size=300, lm_max_text_len=96)
    steps, batch = 5, 8
    tc = TrainConfig(epochs=1, max_steps=steps, batch_size=batch, lr=3e-3, warmup_steps=2, precision="fp32",
                     log_every=1)
    one = tmp_path / "one"
    train(tiny_nanovlm(**fields), tc, one, data_dir=vqa, progress_bar=False)

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "picovlm.cli", "train", "--data", str(vqa), "--out", str(two), "--epochs", "1",
           "--max-steps", str(steps), "--batch-size", str(batch), "--lr", "3e-3", "--warmup-steps", "2",
           "--precision", "fp32", "--log-every", "1", "--no-progress", "--device", "cpu"]
    config = tiny_nanovlm(**fields)
    for name in ("vision_type", "lm_type", "fusion", "img_size", "vit_img_size", "vit_patch_size", "vit_hidden_dim",
                 "vit_inter_dim", "vit_n_heads", "vit_n_blocks", "mp_pixel_shuffle_factor", "lm_hidden_dim",
                 "lm_inter_dim", "lm_n_heads", "lm_n_kv_heads", "lm_n_blocks", "lm_max_position_embeddings",
                 *fields):
        cmd += ["--set", f"{name}={getattr(config, name)}"]
    summary = _torchrun(cmd)
    assert summary["processes"] == 2 and summary["steps"] == steps
    single, double = _losses(one), _losses(two)
    assert len(single) == len(double) == steps
    for a, b in zip(single, double):
        assert abs(a - b) / a < 1e-4, (single, double)
    weights = [load_file(run / "last" / "model.safetensors") for run in (one, two)]
    for name, w in weights[0].items():
        torch.testing.assert_close(weights[1][name], w, rtol=1e-4, atol=1e-5, msg=name)
