"""The frozen-backbone feature cache: it equals running the backbone, training from it gives the
pixel path's loss, and it is rebuilt when the images or the backbone's weights change."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import picovlm.data.features as features_mod
from picovlm.config import TrainConfig
from picovlm.data.batches import crop_and_pool
from picovlm.data.features import backbone_hash, cached_features
from picovlm.data.flickr8k import load_split
from picovlm.data.images import cached_images, normalize
from picovlm.data.prepare import prepare_data, uses_feature_cache
from picovlm.errors import UserError
from picovlm.models.mobilenet_v2 import MobileNetV2
from picovlm.models.supravl import SupraVL
from picovlm.train import evaluate_loss, to_device, train
from tests.conftest import tiny_config


def tiny_mobilenet(**overrides: object) -> SupraVL:
    cfg = tiny_config(vision_type="mobilenet_v2", img_size=64, cnn_grid=2, vision_weights="none", **overrides)
    torch.manual_seed(0)
    model = SupraVL(cfg)
    # A random backbone with BatchNorm's initial statistics shrinks activations ~1e9-fold, to
    # features that are all 0 in float16; statistics of one random batch keep them at unit scale.
    bns = [m for m in model.vis_enc.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = 1.0
    with torch.no_grad():
        model.vis_enc.features.train()(torch.randn(8, 3, 64, 64))
    model.vis_enc.train()  # the backbone back in eval mode
    for bn in bns:
        bn.momentum = 0.1
    return model


def saved_backbone(model: SupraVL, path: Path) -> Path:
    """tiny_mobilenet's backbone as a torchvision-layout weights file, for train() to load."""
    full = MobileNetV2()
    full.features.load_state_dict(model.vis_enc.features.state_dict())
    torch.save(full.state_dict(), path)
    return path


def test_cached_features_equal_running_the_backbone(tmp_path: Path, shapes_dir: Path) -> None:
    model = tiny_mobilenet()
    split = load_split(shapes_dir, "dev")
    images, _ = cached_images(split.image_dir, split.names, 64)
    feats = cached_features(model.vis_enc, images, split.image_dir, split.names, model.cfg, tmp_path)
    assert feats.shape == (len(split.names), 4, 1280) and feats.dtype == np.float16
    assert np.abs(np.array(feats, dtype=np.float32)).mean() > 0.1  # not trivially zero
    with torch.no_grad():
        direct = model.vis_enc.backbone_features(normalize(torch.from_numpy(np.array(images[:8])),
                                                           model.cfg.img_mean, model.cfg.img_std))
        torch.testing.assert_close(torch.from_numpy(np.array(feats[:8])).float(), direct, rtol=2e-3, atol=2e-3)
        # The model accepts the features in place of the pixels and gives the same visual tokens.
        tokens = model.vis_enc(torch.from_numpy(np.array(feats[:8])).float())
        torch.testing.assert_close(tokens, model.vis_enc(normalize(torch.from_numpy(np.array(images[:8])),
                                                                   model.cfg.img_mean, model.cfg.img_std)),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batches_from_the_cache_give_the_pixel_paths_loss(shapes_dir: Path, precision: str) -> None:
    model = tiny_mobilenet(vision_proj="mlp")
    pixels = prepare_data(shapes_dir, model.cfg, None)
    cached = prepare_data(shapes_dir, model.cfg, pixels.tokenizer, frozen_encoder=model.vis_enc)
    assert cached.train.is_features and cached.dev.is_features and not pixels.train.is_features
    tc = TrainConfig(batch_size=16, eval_max_batches=3)
    a = evaluate_loss(model, pixels.dev, tc, "cpu", precision)
    b = evaluate_loss(model, cached.dev, tc, "cpu", precision)
    assert a == pytest.approx(b, rel=1e-3 if precision == "fp32" else 1e-2)
    batch = next(cached.train.epoch(4, seed=0))
    images, input_ids, _ = to_device(batch, model.cfg, "cpu")
    assert images.shape == (4, 4, 1280) and images.dtype == torch.float32
    assert torch.equal(input_ids, next(pixels.train.epoch(4, seed=0)).input_ids)


@pytest.mark.parametrize("progress", [True, False])
def test_cache_progress_bars_follow_the_progress_switch(tmp_path: Path, shapes_dir: Path, progress: bool,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PICOVLM_CACHE", str(tmp_path))  # empty: both caches are built here
    model = tiny_mobilenet()
    prepare_data(shapes_dir, model.cfg, None, frozen_encoder=model.vis_enc, progress=progress)
    err = capsys.readouterr().err
    for bar in ("caching images", "caching backbone features"):
        assert (bar in err) == progress, err


def test_cache_is_rebuilt_when_images_or_weights_change(tmp_path: Path, shapes_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_mobilenet()
    split = load_split(shapes_dir, "dev")
    images, _ = cached_images(split.image_dir, split.names, 64)
    computed = []
    real_compute = features_mod._compute
    monkeypatch.setattr(features_mod, "_compute", lambda *a, **k: computed.append(1) or real_compute(*a, **k))

    def run() -> np.ndarray:
        return cached_features(model.vis_enc, images, split.image_dir, split.names, model.cfg, tmp_path)

    first = np.array(run())
    run()
    assert len(computed) == 1  # the second call read the file
    path = split.image_dir / split.names[0]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the image "changed"
    run()
    assert len(computed) == 2
    meta = json.loads(next(tmp_path.glob("features-*.json")).read_text())
    assert meta["backbone_sha1"] == backbone_hash(model.vis_enc.features)
    with torch.no_grad():
        model.vis_enc.features[0][0].weight.mul_(2)  # other backbone weights: another cache file
    second = np.array(run())
    assert len(computed) == 3 and len(list(tmp_path.glob("features-*.npy"))) == 2
    assert not np.array_equal(first, second)


def test_training_uses_the_cache_only_without_augmentation(tmp_path: Path, shapes_dir: Path) -> None:
    model = tiny_mobilenet()
    assert uses_feature_cache(model, TrainConfig())
    assert not uses_feature_cache(model, TrainConfig(augment=True))
    assert not uses_feature_cache(model, TrainConfig(feature_cache=False))
    assert not uses_feature_cache(SupraVL(tiny_config()), TrainConfig())
    # Two fp32 steps from the cache and from pixels end at the same losses, with a backbone whose
    # features are not all zero.
    cfg = dataclasses.replace(model.cfg, vision_weights=str(saved_backbone(model, tmp_path / "backbone.pth")))
    tc = TrainConfig(epochs=1, max_steps=2, batch_size=8, warmup_steps=1, log_every=1, eval_max_batches=2,
                     precision="fp32")
    a = train(cfg, tc, tmp_path / "cached", data_dir=shapes_dir, progress_bar=False)
    b = train(cfg, dataclasses.replace(tc, feature_cache=False), tmp_path / "pixels", data_dir=shapes_dir,
              progress_bar=False)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert a["best_val_loss"] == pytest.approx(b["best_val_loss"], rel=1e-3)
    cache = Path(os.environ["PICOVLM_CACHE"])
    assert list(cache.glob("features-*.npy"))
    # --mirror-features trains from a second cache, of the mirrored images; it needs the cache.
    mirrored = train(cfg, dataclasses.replace(tc, mirror_features=True), tmp_path / "mirrored",
                     data_dir=shapes_dir, progress_bar=False)
    assert math.isfinite(mirrored["train_loss"])
    assert any(json.loads(p.read_text()).get("mirrored") for p in cache.glob("features-*.json"))
    with pytest.raises(UserError, match="--mirror-features needs a frozen MobileNetV2") as refused:
        train(cfg, dataclasses.replace(tc, mirror_features=True, augment=True), tmp_path / "augmented",
              data_dir=shapes_dir, progress_bar=False)
    # the message names the switch that turns off the flag at fault, not the other one
    assert "--no-mirror-features" in str(refused.value) and "--feature-crop" not in str(refused.value)
    # --feature-crop trains on crops of the whole maps, from a third cache; it needs the cache too.
    cropped = train(cfg, dataclasses.replace(tc, feature_crop=0.5), tmp_path / "cropped", data_dir=shapes_dir,
                    progress_bar=False)
    assert math.isfinite(cropped["train_loss"]) and cropped["best_val_loss"] == pytest.approx(a["best_val_loss"],
                                                                                               rel=0.2)
    assert any(json.loads(p.read_text())["grid"] is None for p in cache.glob("features-*.json"))
    with pytest.raises(UserError, match="--feature-crop needs a frozen MobileNetV2") as refused:
        train(cfg, dataclasses.replace(tc, feature_crop=0.5, feature_cache=False), tmp_path / "uncached",
              data_dir=shapes_dir, progress_bar=False)
    assert "turn it off: --feature-crop 1" in str(refused.value) and "mirror" not in str(refused.value)
    with pytest.raises(UserError, match="--mirror-features and --feature-crop need a frozen MobileNetV2") as refused:
        train(cfg, dataclasses.replace(tc, feature_crop=0.5, mirror_features=True, feature_cache=False),
              tmp_path / "uncached", data_dir=shapes_dir, progress_bar=False)
    assert "turn them off: --no-mirror-features, --feature-crop 1" in str(refused.value)
    with pytest.raises(UserError, match=r"--feature-crop .* in \(0, 1\]; got 0"):
        train(cfg, dataclasses.replace(tc, feature_crop=0.0), tmp_path / "empty", data_dir=shapes_dir,
              progress_bar=False)


def test_mirrored_features_are_the_backbone_on_mirrored_pixels(tmp_path: Path, shapes_dir: Path) -> None:
    model = tiny_mobilenet()
    split = load_split(shapes_dir, "dev")
    images, _ = cached_images(split.image_dir, split.names, 64)
    plain = cached_features(model.vis_enc, images, split.image_dir, split.names, model.cfg, tmp_path)
    mirrored = cached_features(model.vis_enc, images, split.image_dir, split.names, model.cfg, tmp_path,
                               mirrored=True)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2  # one cache file each
    with torch.no_grad():
        flipped = torch.from_numpy(np.array(images[:8, :, ::-1]))  # (8, S, S, 3), left and right swapped
        direct = model.vis_enc.backbone_features(normalize(flipped, model.cfg.img_mean, model.cfg.img_std))
    torch.testing.assert_close(torch.from_numpy(np.array(mirrored[:8])).float(), direct, rtol=2e-3, atol=2e-3)
    assert not np.allclose(np.array(plain[:8], dtype=np.float32), np.array(mirrored[:8], dtype=np.float32))


def test_mirroring_serves_mirrored_features_for_half_the_flippable_captions(shapes_dir: Path) -> None:
    model = tiny_mobilenet()
    data = prepare_data(shapes_dir, model.cfg, None, frozen_encoder=model.vis_enc, progress=False,
                        mirror_features=True)
    assert data.train.mirrored is not None and data.dev.mirrored is None  # dev is never mirrored
    train_set = data.train
    n = len(train_set.images)
    # Features that name their image: i for image i, -(i + 1) for its mirror.
    train_set.use_features(np.arange(n, dtype=np.float32).reshape(n, 1, 1),
                           -np.arange(1, n + 1, dtype=np.float32).reshape(n, 1, 1))
    batches = list(train_set.epoch(16, seed=3))
    values = torch.cat([b.images.flatten() for b in batches]).float()
    flippable = torch.cat([b.flippable for b in batches])
    mirrored = values < 0
    assert not mirrored[~flippable].any()  # a caption that says left or right keeps its image
    assert 0.35 < mirrored[flippable].float().mean() < 0.65
    # Mirroring changes which features a caption gets, not which image or caption comes when.
    mirrors, train_set.mirrored = train_set.mirrored, None
    plain = torch.cat([b.images.flatten() for b in train_set.epoch(16, seed=3)]).float()
    train_set.mirrored = mirrors
    assert torch.equal(torch.where(mirrored, -values - 1, values), plain)
    # A resumed epoch mirrors the same captions; an unshuffled one mirrors none.
    resumed = list(train_set.epoch(16, seed=3, start_batch=2))
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches[2:], resumed, strict=True))
    assert all((b.images >= 0).all() for b in train_set.epoch(16, seed=None))


def test_crop_and_pool_cuts_the_drawn_window_and_pools_it_like_the_encoder() -> None:
    side, grid, C = 6, 3, 2
    cells = torch.arange(side * side, dtype=torch.float32)  # cell (r, c) holds r * side + c
    maps = torch.stack([cells, torch.ones_like(cells)], dim=1).expand(2, -1, -1).to(torch.float16)  # (2, 36, 2)
    whole = crop_and_pool(maps, grid, 0.25, None)  # (2, 9, 2): every crop the whole map
    expected = torch.nn.functional.adaptive_avg_pool2d(cells.view(1, side, side), grid).flatten()
    assert whole.shape == (2, grid * grid, C) and whole.dtype == torch.float16
    torch.testing.assert_close(whole[0, :, 0].float(), expected)
    # Area share 0.25 (u_scale 0) is a 3x3 window: pooled to 3x3 its cells come out unchanged.
    # u_top, u_left 0 put it top-left; just under 1, bottom-right.
    draws = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.999, 0.999]])
    cropped = crop_and_pool(maps, grid, 0.25, draws)[:, :, 0].float()
    torch.testing.assert_close(cropped[0], torch.tensor([0, 1, 2, 6, 7, 8, 12, 13, 14.0]))
    torch.testing.assert_close(cropped[1], torch.tensor([21, 22, 23, 27, 28, 29, 33, 34, 35.0]))
    # u_scale just under 1 is the whole map wherever it is placed; the constant channel stays 1.
    full = crop_and_pool(maps, grid, 0.25, torch.tensor([[0.999, 0.5, 0.5], [0.999, 0.0, 0.9]]))
    torch.testing.assert_close(full, whole)
    assert torch.all(full[:, :, 1] == 1)


def test_whole_maps_pooled_are_the_grid_features(tmp_path: Path, shapes_dir: Path) -> None:
    model = tiny_mobilenet()
    cfg = dataclasses.replace(model.cfg, img_size=128)  # a 4x4 map, pooled to the 2x2 grid
    split = load_split(shapes_dir, "dev")
    images, _ = cached_images(split.image_dir, split.names, 128)
    grid = cached_features(model.vis_enc, images, split.image_dir, split.names, cfg, tmp_path)
    maps = cached_features(model.vis_enc, images, split.image_dir, split.names, cfg, tmp_path, whole_map=True)
    assert grid.shape == (len(split.names), 4, 1280) and maps.shape == (len(split.names), 16, 1280)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2  # one cache file each
    pooled = crop_and_pool(torch.from_numpy(np.array(maps)), 2, 0.5, None).float()
    torch.testing.assert_close(pooled, torch.from_numpy(np.array(grid)).float(), rtol=2e-3, atol=2e-3)


def test_feature_crops_are_drawn_per_caption_and_epoch_and_resume_alike(shapes_dir: Path) -> None:
    model = tiny_mobilenet()
    cfg = dataclasses.replace(model.cfg, img_size=128)
    data = prepare_data(shapes_dir, cfg, None, frozen_encoder=model.vis_enc, progress=False, feature_crop=0.3)
    train_set, dev_set = data.train, data.dev
    assert train_set.images.shape[1] == 16 and dev_set.images.shape[1] == 4  # whole maps; dev pooled
    assert train_set.crop_scale == 0.3 and dev_set.crop_scale == 1.0
    first = list(train_set.epoch(16, seed=3))
    assert all(b.images.shape == (len(b.input_ids), 4, 1280) and b.is_features for b in first)
    whole = list(train_set.epoch(16, seed=None))  # unshuffled: the whole map, pooled
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(3))[:16]
    uncropped = crop_and_pool(train_set.images[train_set.image_of[order]], 2, 1.0, None)
    assert not torch.equal(first[0].images, uncropped)  # crops, not the whole map
    torch.testing.assert_close(whole[0].images, crop_and_pool(train_set.images[train_set.image_of[:16]], 2, 1.0,
                                                              None))
    other = list(train_set.epoch(16, seed=4))
    assert not torch.equal(first[0].images, other[0].images)
    resumed = list(train_set.epoch(16, seed=3, start_batch=2))
    assert all(torch.equal(a.images, b.images) for a, b in zip(first[2:], resumed, strict=True))
