"""The SigLIP-compatible ViT, its weight loader and the pixel-shuffle projector.

The equivalence tests build small random SigLIP models with transformers, save them as Hugging
Face folders, load them through picovlm.siglip and compare patch embeddings on random pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file, save_file

from picovlm.config import VLMConfig, nanovlm_222m
from picovlm.errors import UserError
from picovlm.models.projector import ModalityProjector, pixel_shuffle
from picovlm.models.supravl import SupraVL
from picovlm.models.vit import ViT, vit_param_count
from picovlm.siglip import load_siglip_vit, resolve_source, siglip_vision_config

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8)


def vit_config(**overrides: object) -> VLMConfig:
    base = dict(vision_type="vit", vit_hidden_dim=64, vit_inter_dim=128, vit_n_heads=4, vit_n_blocks=2,
                vit_patch_size=8, vit_img_size=32, lm_type="llama", fusion="placeholder", lm_n_kv_heads=2)
    return VLMConfig(**{**base, **overrides})


# --- the ViT itself -------------------------------------------------------------------------


def test_vit_shapes_and_config_validation() -> None:
    cfg = vit_config()
    cfg.validate()
    vit = ViT(cfg)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="32x32"):
        vit(torch.randn(1, 3, 48, 48))
    with pytest.raises(UserError, match="not divisible by vit_n_heads"):
        vit_config(vit_n_heads=5).validate()
    with pytest.raises(UserError, match="not a multiple of vit_patch_size"):
        vit_config(vit_img_size=36).validate()
    with pytest.raises(UserError, match="mp_pixel_shuffle_factor=3"):
        vit_config(mp_pixel_shuffle_factor=3).validate()
    with pytest.raises(UserError, match="vit_dropout"):
        vit_config(vit_dropout=1.0).validate()
    VLMConfig(vit_n_heads=5).validate()  # vit_ fields are not checked while the encoder is the CNN
    with pytest.raises(UserError, match="NanoVLM"):
        SupraVL(cfg)  # never a CNN built silently from a vit config


def test_attention_is_not_causal() -> None:
    """Changing the last patch changes the first patch's output: every patch sees every patch."""
    torch.manual_seed(0)
    vit = ViT(vit_config()).eval()
    images = torch.randn(1, 3, 32, 32)
    changed = images.clone()
    changed[..., 24:, 24:] += 1.0  # the bottom-right patch only
    assert not torch.allclose(vit(images)[0, 0], vit(changed)[0, 0])


def test_param_count_matches_the_module_and_published_numbers() -> None:
    for cfg in (vit_config(), VLMConfig(), vit_config(vit_n_blocks=3, vit_inter_dim=96)):
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            assert vit_param_count(cfg) == sum(p.numel() for p in ViT(cfg).parameters())
    assert vit_param_count(VLMConfig()) == 85_797_120  # SigLIP-B/16-224 without its pooling head
    # nanoVLM's tiny variants in the practitioner's table (seed 003): 1 block, 1 head, 768 wide.
    for inter, published in ((3072, 7_830_528), (1536, 5_469_696), (768, 4_289_280)):
        assert vit_param_count(VLMConfig(vit_n_blocks=1, vit_n_heads=1, vit_inter_dim=inter)) == published


# --- loading SigLIP checkpoints --------------------------------------------------------------


@pytest.fixture
def transformers() -> ModuleType:
    return pytest.importorskip("transformers")


def _max_diff(folder: Path, reference: torch.nn.Module) -> float:
    torch.manual_seed(1)
    vit, fields = load_siglip_vit(folder)
    pixels = torch.randn(3, 3, fields["vit_img_size"], fields["vit_img_size"])
    with torch.no_grad():
        ours = vit.eval()(pixels)
        theirs = reference.eval()(pixel_values=pixels).last_hidden_state
    return (ours - theirs).abs().max().item()


def test_siglip_vision_model_matches_transformers(transformers: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, image_size=32))
    hf.save_pretrained(tmp_path)
    vit, fields = load_siglip_vit(tmp_path)
    assert fields == {"vision_type": "vit", "img_size": 32, "img_mean": (0.5,) * 3, "img_std": (0.5,) * 3,
                      "vit_hidden_dim": 64, "vit_inter_dim": 128, "vit_n_heads": 4, "vit_n_blocks": 2,
                      "vit_patch_size": 8, "vit_img_size": 32, "vit_ln_eps": 1e-6}
    nanovlm_222m().with_overrides(fields)  # the fields make a valid model config
    assert all(p.requires_grad and p.dtype == torch.float32 and p.device.type == "cpu" for p in vit.parameters())
    assert _max_diff(tmp_path, hf) <= 1e-4


def test_siglip_vision_model_with_transformers_4_key_names(transformers: ModuleType, tmp_path: Path) -> None:
    """transformers 4 saved SiglipVisionModel's tensors under `vision_model.`, as on the Hub."""
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, image_size=32))
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in state.items()}, tmp_path / "model.safetensors")
    assert _max_diff(tmp_path, hf) <= 1e-4


def test_siglip_model_matches_transformers(transformers: ModuleType, tmp_path: Path) -> None:
    """A SiglipModel folder: vision fields nested in vision_config, a text tower to ignore.
    The fixed-resolution SigLIP 2 checkpoints (siglip2-base-patch16-224/512) have this layout."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
    vision = dict(SMALL, image_size=48)
    hf = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    hf.save_pretrained(tmp_path)
    assert _max_diff(tmp_path, hf.vision_model) <= 1e-4


def test_siglip2_naflex_at_a_fixed_resolution_matches_transformers(transformers: ModuleType, tmp_path: Path) -> None:
    """A NaFlex model (Linear patch embedding, 4x4 position grid) used at 48 px = a 6x6 grid: our
    Conv2d and once-resized grid give what transformers computes from patchified pixels."""
    torch.manual_seed(0)
    hf = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**SMALL, num_patches=16))
    hf.save_pretrained(tmp_path)
    for size in (32, 48):  # 32 px: the model's own 4x4 grid; 48 px: resized to 6x6
        vit, fields = load_siglip_vit(tmp_path, img_size=size)
        pixels = torch.randn(2, 3, size, size)
        g, P = size // 8, 8
        # transformers' Siglip2 image processor: (C, H, W) -> (g*g, P*P*C), rows of patches row-major.
        patches = pixels.view(2, 3, g, P, g, P).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, P * P * 3)
        with torch.no_grad():
            theirs = hf.eval()(pixel_values=patches, pixel_attention_mask=torch.ones(2, g * g, dtype=torch.long),
                               spatial_shapes=torch.tensor([[g, g]] * 2)).last_hidden_state
            ours = vit.eval()(pixels)
        assert (ours - theirs).abs().max().item() <= 1e-4, size


def test_published_config_files_read_as_expected(tmp_path: Path) -> None:
    """Hub config.json files leave out the fields equal to transformers' defaults."""
    (tmp_path / "config.json").write_text(json.dumps({  # google/siglip-base-patch16-224's, text_config cut
        "architectures": ["SiglipModel"], "model_type": "siglip", "text_config": {"vocab_size": 32000},
        "vision_config": {"model_type": "siglip_vision_model", "patch_size": 16}}))
    fields, naflex = siglip_vision_config(tmp_path)
    defaults = VLMConfig()
    assert not naflex and all(value == getattr(defaults, name) for name, value in fields.items()
                              if name.startswith("vit_"))
    assert (fields["img_size"], fields["img_mean"], fields["img_std"]) == (224, (0.5,) * 3, (0.5,) * 3)
    # google/siglip2-base-patch16-512 (nanoVLM's later encoder) is a fixed-resolution "siglip" model.
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "siglip", "vision_config": {"image_size": 512, "model_type": "siglip_vision_model"}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                   "image_std": [0.25, 0.25, 0.25]}))
    fields, _ = siglip_vision_config(tmp_path)
    assert (fields["vit_img_size"], fields["img_std"]) == (512, (0.25,) * 3)
    assert nanovlm_222m().with_overrides({**fields, "mp_pixel_shuffle_factor": 4}).vit_img_size == 512
    # SigLIP 2 NaFlex: a 16x16 position grid, 256 px unless told otherwise.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2", "vision_config": {}}))
    assert siglip_vision_config(tmp_path)[0]["vit_img_size"] == 256
    assert siglip_vision_config(tmp_path, img_size=224) == ({**fields, "img_size": 224, "vit_img_size": 224,
                                                             "img_std": (0.25,) * 3}, True)
    for bad, pattern in (({"hidden_size": 770}, "not divisible by vit_n_heads"),
                         ({"image_size": [224, 160]}, r"image_size=\[224, 160\]"),
                         ({"hidden_size": 768.0}, "vit_hidden_dim has the wrong type")):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", **bad}))
        with pytest.raises(UserError, match=pattern):
            siglip_vision_config(tmp_path)


def test_loader_errors_are_one_line_user_errors(transformers: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL, image_size=32)).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())

    def expect(pattern: str, **kwargs: object) -> None:
        with pytest.raises(UserError, match=pattern) as info:
            load_siglip_vit(tmp_path, **kwargs)
        assert "\n" not in str(info.value)

    broken = dict(state)
    del broken["encoder.layers.1.mlp.fc2.bias"]
    save_file(broken, tmp_path / "model.safetensors")
    expect(r"missing \['encoder.layers.1.mlp.fc2.bias'\]")
    save_file({**state, "encoder.layers.2.mlp.fc2.bias": state["encoder.layers.1.mlp.fc2.bias"].clone()},
              tmp_path / "model.safetensors")
    expect(r"unexpected \['encoder.layers.2.mlp.fc2.bias'\]")
    save_file({**state, "encoder.layers.0.mlp.fc1.weight": torch.zeros(96, 64)}, tmp_path / "model.safetensors")
    expect(r"wrong shapes \['encoder.layers.0.mlp.fc1.weight \(96, 64\) vs \(128, 64\)'\]")
    save_file(state, tmp_path / "model.safetensors")
    expect("trained at 32 px", img_size=64)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    expect("not a SigLIP model")
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    expect("hidden_act 'relu'")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    expect("cannot read .*model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    expect("no model.safetensors")
    with pytest.raises(UserError, match="no such folder"):
        resolve_source(tmp_path / "nowhere")
    with pytest.raises(UserError, match="cannot get nobody/no-such-siglip from the Hugging Face Hub"):
        resolve_source("nobody/no-such-siglip")  # HF_HUB_OFFLINE=1 (conftest): never the network


def test_siglip_base_parameter_counts(transformers: ModuleType) -> None:
    """SigLIP-B/16-224 built by transformers (random weights): with and without the pooling head."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig())
    total = sum(p.numel() for p in hf.parameters())
    head = sum(p.numel() for p in hf.head.parameters())
    assert (total, head, total - head) == (92_884_224, 7_087_104, 85_797_120)
    assert total - head == vit_param_count(VLMConfig())


# --- pixel shuffle and the projector ---------------------------------------------------------


def test_pixel_shuffle_gathers_each_neighbourhood() -> None:
    """A 4x4 grid whose patch at (row, col) is the vector [10*row + col, -(10*row + col)]."""
    ids = torch.tensor([[10 * r + c for c in range(4)] for r in range(4)], dtype=torch.float32).flatten()
    x = torch.stack([ids, -ids], dim=-1)[None]  # (1, 16, 2)
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 8)
    # Token (i, j) holds patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), each D=2 channels.
    assert y[0, 0].tolist() == [0, 0, 1, -1, 10, -10, 11, -11]
    assert y[0, 1].tolist() == [2, -2, 3, -3, 12, -12, 13, -13]
    assert y[0, 2].tolist() == [20, -20, 21, -21, 30, -30, 31, -31]
    assert y[0, 3].tolist() == [22, -22, 23, -23, 32, -32, 33, -33]
    assert torch.equal(pixel_shuffle(x, 1), x)
    assert pixel_shuffle(x, 4)[0, 0, ::2].tolist() == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]


def test_pixel_shuffle_errors() -> None:
    with pytest.raises(ValueError, match="14x14 patch grid is not divisible by the factor r=3"):
        pixel_shuffle(torch.zeros(1, 196, 8), 3)
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 15, 8), 1)


def test_projector_token_counts() -> None:
    vit_out = torch.randn(2, 196, 768)  # SigLIP-B/16-224
    assert ModalityProjector(VLMConfig(lm_hidden_dim=576))(vit_out).shape == (2, 49, 576)  # nanoVLM-222M
    cfg = VLMConfig(vit_img_size=512, mp_pixel_shuffle_factor=4, lm_hidden_dim=960)  # nanoVLM's 512-px setup
    assert ModalityProjector(cfg)(torch.randn(1, 1024, 768)).shape == (1, 64, 960)
    assert ModalityProjector(cfg).proj.bias is None
