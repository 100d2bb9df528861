"""Recipes: presets that carry training settings (PRESET_TRAIN), used by `picovlm train` unless the
user overrides them, and label smoothing in the training loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import picovlm.config as config_mod
from picovlm.cli import build_parser, main
from picovlm.config import PRESET_TRAIN, PRESETS, TrainConfig, get_preset, preset_train_config
from picovlm.errors import UserError
from picovlm.models.supravl import IGNORE_INDEX, SupraVL
from picovlm.train import train, train_step
from tests.conftest import tiny_config


def test_preset_train_settings_apply_unless_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PRESET_TRAIN, "supravl-nano", {"epochs": 7, "label_smoothing": 0.1})
    tc = preset_train_config("supravl-nano")
    assert (tc.epochs, tc.label_smoothing, tc.lr) == (7, 0.1, TrainConfig.lr)
    tc = preset_train_config("supravl-nano", epochs=3, lr=None)  # None: not given
    assert (tc.epochs, tc.label_smoothing, tc.lr) == (3, 0.1, TrainConfig.lr)
    with pytest.raises(UserError, match="unknown preset"):
        preset_train_config("supravl-giant")


def test_pico_mobilenet_mirrors_and_crops_its_features_unless_augmenting_or_told_not_to() -> None:
    tc = preset_train_config("pico-mobilenet")
    assert tc.mirror_features and tc.feature_crop == 0.3 and tc.epochs == 8
    # --augment flips and crops pixels itself and turns the feature cache off: the preset's
    # mirroring and cropping yield ...
    tc = preset_train_config("pico-mobilenet", augment=True)
    assert tc.augment and not tc.mirror_features and tc.feature_crop == 1.0
    # ... but an explicit request stays, so that train() can say the two do not go together.
    assert preset_train_config("pico-mobilenet", augment=True, mirror_features=True).mirror_features
    assert preset_train_config("pico-mobilenet", augment=True, feature_crop=0.7).feature_crop == 0.7
    assert not preset_train_config("pico-mobilenet", mirror_features=False).mirror_features
    assert preset_train_config("pico-mobilenet", feature_crop=1.0).feature_crop == 1.0
    assert not preset_train_config("pico-scratch").mirror_features
    assert preset_train_config("pico-scratch").feature_crop == 1.0
    parse = build_parser().parse_args
    base = ["train", "--preset", "pico-mobilenet", "--data", "d", "--out", "o"]
    assert [parse([*base, *flag]).mirror_features for flag in ([], ["--mirror-features"], ["--no-mirror-features"])] \
        == [None, True, False]
    assert [parse([*base, *flag]).feature_crop for flag in ([], ["--feature-crop", "0.7"])] == [None, 0.7]


def test_pico_mobilenet_stores_its_best_measured_decoding_and_bad_ones_are_refused() -> None:
    assert preset_train_config("pico-mobilenet").generation == {"strategy": "mbr", "beam_width": 8, "mirror": True,
                                                                "center_crop": 0.8, "mbr_temperature": 4.0}
    assert preset_train_config("supravl-nano").generation == {}  # picovlm's default decoding
    for bad, message in (({"beam_size": 8}, "unknown decoding settings \\(beam_size\\)"),
                         ({"strategy": "beam", "mbr_temperature": 4.0}, "strategy 'beam' has none")):
        with pytest.raises(UserError, match=message):  # before any data is read or anything trained
            train(tiny_config(), TrainConfig(generation=bad), "unused", progress_bar=False)


def test_augment_scale_reaches_the_train_config_beside_the_presets_augment() -> None:
    args = build_parser().parse_args(["train", "--preset", "pico-scratch", "--data", "d", "--out", "o",
                                      "--augment-scale", "0.5"])
    tc = preset_train_config("pico-scratch", augment=args.augment, augment_scale=args.augment_scale)
    assert tc.augment and tc.augment_scale == 0.5 and tc.epochs == PRESET_TRAIN["pico-scratch"]["epochs"]
    assert preset_train_config("pico-scratch").augment_scale == TrainConfig.augment_scale == 0.7


def test_every_preset_recipe_names_real_train_fields() -> None:
    for name, settings in PRESET_TRAIN.items():
        assert name in PRESETS
        preset_train_config(name)  # TrainConfig(**settings) accepts them
        assert set(settings) <= set(TrainConfig().to_dict())


def test_issue_3_presets_stay_within_their_parameter_budgets() -> None:
    assert SupraVL(get_preset("pico-scratch")).param_counts()["params_unique"] <= 1_000_000
    assert SupraVL(get_preset("pico-mobilenet")).param_counts()["trainable"] <= 2_000_000


def test_train_cli_uses_the_preset_recipe(tmp_path: Path, shapes_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(config_mod.PRESETS, "tiny-test", lambda: tiny_config())
    decoding = {"strategy": "mbr", "beam_width": 4, "mirror": True, "mbr_temperature": 2.0}
    monkeypatch.setitem(PRESET_TRAIN, "tiny-test", {"epochs": 1, "batch_size": 16, "label_smoothing": 0.2,
                                                    "lr": 1e-3, "generation": decoding})
    args = ["train", "--preset", "tiny-test", "--data", str(shapes_dir), "--no-progress", "--max-steps", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    train = json.loads((tmp_path / "a" / "train_config.json").read_text())["train"]
    assert (train["epochs"], train["batch_size"], train["label_smoothing"], train["lr"]) == (1, 16, 0.2, 1e-3)
    for saved in ("best", "last"):  # the recipe's decoding travels with every checkpoint
        assert json.loads((tmp_path / "a" / saved / "generation_config.json").read_text()) == decoding
    assert main([*args, "--out", str(tmp_path / "b"), "--label-smoothing", "0", "--lr", "2e-3"]) == 0
    train = json.loads((tmp_path / "b" / "train_config.json").read_text())["train"]
    assert (train["label_smoothing"], train["lr"], train["batch_size"]) == (0.0, 2e-3, 16)


def test_label_smoothing_changes_the_training_loss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = SupraVL(tiny_config()).eval()
    images, ids = torch.randn(3, 3, 32, 32), torch.randint(3, 300, (3, 7))
    targets = torch.randint(3, 300, (3, 7))
    targets[0, 5:] = IGNORE_INDEX
    logits, plain = model(images, ids, targets)
    _, smoothed = model(images, ids, targets, loss_only=True, label_smoothing=0.1)
    keep = targets != IGNORE_INDEX
    logp = F.log_softmax(logits[keep].float(), dim=-1)
    nll = -logp.gather(1, targets[keep][:, None]).squeeze(1)
    expected = (0.9 * nll - 0.1 * logp.mean(dim=-1)).mean()  # 1 - eps on the target, eps uniform
    torch.testing.assert_close(smoothed, expected)
    assert smoothed > plain  # a uniform share of the mass costs extra on a confident target

    # train_step passes TrainConfig.label_smoothing to the loss.
    seen = []
    real_forward = SupraVL.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(SupraVL, "forward", spy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_step(model.train(), optimizer, None, (images, ids, targets), TrainConfig(label_smoothing=0.1),
               "fp32", "cpu", 0)
    assert seen == [0.1]
