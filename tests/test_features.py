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
    with pytest.raises(UserError, match="--mirror-features needs a frozen MobileNetV2"):
        train(cfg, dataclasses.replace(tc, mirror_features=True, augment=True), tmp_path / "augmented",
              data_dir=shapes_dir, progress_bar=False)


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
