"""Loading SigLIP's vision tower from a Hugging Face folder or Hub repo into picovlm's ViT.

A source is a local folder holding `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`), or a Hub repo id such as `google/siglip-base-patch16-224`,
fetched with huggingface_hub.snapshot_download into the usual Hugging Face cache. Weights are
read from safetensors only, which hold tensors and nothing else; pickled `.bin` files are refused.

Which checkpoints fit, told apart by `model_type` in config.json:

    siglip                 SiglipModel: image and text towers; the vision fields sit in
                           config.json's `vision_config`, the tensors under `vision_model.`
    siglip_vision_model    SiglipVisionModel: the vision tower alone; fields at the top level,
                           tensors under `vision_model.` (transformers 4) or unprefixed (5)
    siglip2 /              SigLIP 2 "NaFlex" (e.g. google/siglip2-base-patch16-naflex): same
    siglip2_vision_model   blocks, but a Linear patch embedding over flattened patches and a
                           16x16 grid of position embeddings that transformers resizes to each
                           image's own grid. Loaded here at one fixed square resolution: the
                           Linear becomes the equivalent Conv2d and the grid is resized once,
                           bilinearly with antialiasing as transformers does, to img_size / patch.

The fixed-resolution SigLIP 2 checkpoints (google/siglip2-base-patch16-224, -256, -384, -512,
the one nanoVLM uses) are published as `siglip` models and load as such. Only the tensors of the
vision tower are read; the text tower, logit scale and bias, and the attention-pooling `head.*`
(which nanoVLM drops too) are ignored. Every tensor the ViT needs must be there with the right
shape and no other vision tensor may be left over, else a one-line UserError says what differs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from picovlm.config import VLMConfig
from picovlm.errors import UserError, first_line
from picovlm.models.vit import ViT

# transformers' SiglipVisionConfig defaults (SigLIP-B/16-224): config.json files on the Hub
# often leave out the fields that equal them, google/siglip-base-patch16-224's included.
SIGLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "num_patches": 256,  # num_patches: SigLIP 2 NaFlex only
}
# model_type -> (vision fields nested under "vision_config"?, NaFlex layout?)
MODEL_TYPES = {"siglip": (True, False), "siglip_vision_model": (False, False),
               "siglip2": (True, True), "siglip2_vision_model": (False, True)}
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")  # two names for the same tanh approximation
SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)  # SigLIP's image processor maps [0, 1] pixels to [-1, 1]
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "model.safetensors.index.json",
             "model-*-of-*.safetensors"]

# Our state-dict names -> Hugging Face's (after the `vision_model.` prefix), as regex substitutions;
# names not matched (post_layernorm.*) are the same in both.
RENAMES = [
    (r"^patch_embedding\.", "embeddings.patch_embedding."),
    (r"^position_embedding$", "embeddings.position_embedding.weight"),
    (r"^blocks\.(\d+)\.ln1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.ln2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."),  # q_proj, k_proj, v_proj, out_proj
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),  # fc1, fc2
]


def hf_name(name: str) -> str:
    """Hugging Face's name (without prefix) for one of our ViT's state-dict keys."""
    for pattern, replacement in RENAMES:
        name, n = re.subn(pattern, replacement, name)
        if n:
            break
    return name


def resolve_source(source: str | Path) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (or found in the HF cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{path} is a file; give the folder that holds config.json and model.safetensors")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise UserError(f"{source}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=HUB_FILES))
    except Exception as e:  # unknown repo, no network, HF_HUB_OFFLINE with nothing cached, ...
        raise UserError(f"cannot get {source} from the Hugging Face Hub ({first_line(e)}); check the repo id "
                        f"and the network (HF_HUB_OFFLINE=1 allows only cached repos), or give a local folder"
                        ) from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found; a SigLIP folder needs config.json and model.safetensors") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _square(value: Any, name: str, config_path: Path) -> int:
    """image_size / patch_size: an int, or an [h, w] pair that must be square."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{config_path}: {name}={value!r} is not supported; picovlm's ViT needs one positive "
                        f"int (square images and patches)")
    return value


def siglip_vision_config(folder: Path, img_size: int | None = None) -> tuple[dict[str, Any], bool]:
    """The VLMConfig fields (vision_type, img_*, vit_*) that describe the folder's vision tower, and
    whether it is a NaFlex checkpoint. `img_size` fixes a NaFlex model's resolution (default: its
    own position grid, 256 px for the base models); a fixed-resolution model keeps its own."""
    config_path = folder / "config.json"
    hf = read_json(config_path)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"{config_path}: model_type {model_type!r} is not a SigLIP model; expected one of "
                        f"{', '.join(MODEL_TYPES)}")
    nested, naflex = MODEL_TYPES[model_type]
    vision = hf.get("vision_config", {}) if nested else hf
    if not isinstance(vision, dict):
        raise UserError(f"{config_path}: vision_config is not an object")
    v = {**SIGLIP_VISION_DEFAULTS, **vision}
    if v["hidden_act"] not in TANH_GELUS:
        raise UserError(f"{config_path}: hidden_act {v['hidden_act']!r} is not supported; the ViT uses the "
                        f"tanh-approximated GELU (gelu_pytorch_tanh)")
    if v["num_channels"] != 3:
        raise UserError(f"{config_path}: num_channels={v['num_channels']}; the ViT takes RGB images (3)")
    patch = _square(v["patch_size"], "patch_size", config_path)
    if naflex:
        n = v["num_patches"]
        grid = math.isqrt(n) if isinstance(n, int) and n > 0 else 0
        if grid * grid != n:
            raise UserError(f"{config_path}: num_patches={n!r} is not a square grid of patches")
        size = grid * patch if img_size is None else img_size
    else:
        size = _square(v["image_size"], "image_size", config_path)
        if img_size is not None and img_size != size:
            raise UserError(f"{folder} is trained at {size} px and its position embeddings are not "
                            f"resized; use img_size {size} (only NaFlex checkpoints take another size)")
    mean_std = _mean_std(folder / "preprocessor_config.json")
    fields = {
        "vision_type": "vit", "img_size": size, "img_mean": mean_std[0], "img_std": mean_std[1],
        "vit_hidden_dim": v["hidden_size"], "vit_inter_dim": v["intermediate_size"],
        "vit_n_heads": v["num_attention_heads"], "vit_n_blocks": v["num_hidden_layers"],
        "vit_patch_size": patch, "vit_img_size": size, "vit_ln_eps": v["layer_norm_eps"],
    }
    try:
        # Types and the vit_ rules (heads divide the width, patches tile the image), checked as for
        # any config. The projector's factor is checked where a projector is built: 1 divides every
        # grid, including the 27 x 27 of siglip-so400m-patch14-384.
        cfg = VLMConfig.from_dict({**fields, "mp_pixel_shuffle_factor": 1}, validate=False)
        cfg.validate_vit()
        checked = cfg.to_dict()
    except UserError as e:
        raise UserError(f"{config_path}: {e}") from None
    return {name: checked[name] for name in fields}, naflex  # as read, with types made exact


def _mean_std(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The image processor's normalisation if the folder has one, else SigLIP's 0.5 / 0.5."""
    if not path.is_file():
        return SIGLIP_MEAN_STD, SIGLIP_MEAN_STD
    pre = read_json(path)
    mean, std = pre.get("image_mean", SIGLIP_MEAN_STD), pre.get("image_std", SIGLIP_MEAN_STD)
    if not all(isinstance(x, list | tuple) and len(x) == 3 for x in (mean, std)):
        raise UserError(f"{path}: image_mean and image_std must be lists of 3 numbers")
    return tuple(mean), tuple(std)  # VLMConfig.from_dict checks that they are numbers


def safetensors_index(folder: Path) -> dict[str, Path]:
    """Every tensor name in the folder's safetensors weights -> the file that holds it."""
    from safetensors import safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
    else:
        raise UserError(f"no model.safetensors in {folder}; picovlm reads safetensors weights only "
                        f"(never pickled .bin files)")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
        except Exception as e:  # missing shard, truncated or garbage file
            raise UserError(f"cannot read {file} ({first_line(e)}); the file is missing, damaged or not "
                            f"safetensors") from None
    return where


def read_tensors(where: dict[str, Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors, so a SiglipModel's text tower is never loaded into memory."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for file in sorted({where[n] for n in names}):
        with safe_open(str(file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in names if where[n] == file})
    return out


def naflex_to_fixed(state: dict[str, torch.Tensor], vit: ViT) -> dict[str, torch.Tensor]:
    """Turn NaFlex's Linear patch embedding and position grid into our Conv2d and fixed grid."""
    w = state["patch_embedding.weight"]
    D, P = vit.cfg.vit_hidden_dim, vit.cfg.vit_patch_size
    if w.shape == (D, P * P * 3):
        # transformers flattens a patch as (row, column, channel); a Conv2d kernel is (channel, row, column).
        state["patch_embedding.weight"] = w.view(D, P, P, 3).permute(0, 3, 1, 2).contiguous()
    pos = state["position_embedding"]
    g = math.isqrt(pos.shape[0]) if pos.ndim == 2 else 0
    if g * g == pos.shape[0] and pos.shape[1] == D:
        grid = pos.view(g, g, D).permute(2, 0, 1)[None].float()  # (1, D, g, g), fp32 as transformers
        grid = F.interpolate(grid, size=(vit.grid, vit.grid), mode="bilinear", align_corners=False, antialias=True)
        state["position_embedding"] = grid[0].flatten(1).T.to(pos.dtype)  # (grid*grid, D), row-major
    return state


def load_siglip_vit(source: str | Path, img_size: int | None = None) -> tuple[ViT, dict[str, Any]]:
    """A ViT holding the SigLIP vision tower at `source` (folder or Hub repo id), and the VLMConfig
    fields it was built from (vision_type, img_size, img_mean, img_std, vit_*), to merge into a
    model's config with `cfg.with_overrides(fields)`."""
    folder = resolve_source(source)
    fields, naflex = siglip_vision_config(folder, img_size)
    with torch.device("meta"):  # shapes only: every tensor is replaced by the file's below
        vit = ViT(VLMConfig(**fields))
    where = safetensors_index(folder)
    prefix = "vision_model." if any(name.startswith("vision_model.") for name in where) else ""
    ours = {hf_name(k): k for k in vit.state_dict()}  # HF name (no prefix) -> our name
    # The file's vision tensors: under the prefix, minus the pooling head nanoVLM drops too.
    theirs = {k[len(prefix):] for k in where if k.startswith(prefix) and not k[len(prefix):].startswith("head.")}
    missing, unexpected = sorted(set(ours) - theirs), sorted(theirs - set(ours))
    if missing or unexpected:
        raise UserError(f"{folder} does not fit a ViT built from its config.json: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]} ({len(missing)} and {len(unexpected)} in all)")
    tensors = read_tensors(where, [prefix + k for k in ours])
    state = {ours[k]: tensors[prefix + k] for k in ours}
    if naflex:
        state = naflex_to_fixed(state, vit)
    expected = vit.state_dict()
    wrong = [f"{hf_name(k)} {tuple(t.shape)} vs {tuple(expected[k].shape)}" for k, t in state.items()
             if t.shape != expected[k].shape]
    if wrong:
        raise UserError(f"{folder} does not fit a ViT built from its config.json: wrong shapes "
                        f"{wrong[:3]} ({len(wrong)} in all; file vs config)")
    # fp32 whatever the file holds (fp32, bf16, fp16), like every other picovlm module.
    vit.load_state_dict({k: t.float() for k, t in state.items()}, strict=True, assign=True)
    return vit, fields
