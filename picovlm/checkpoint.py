"""Hub-format checkpoints: a folder with model.safetensors, config.json, tokenizer.json, README.md,
and for a captioner with a decoding of its own, generation_config.json (GenerationConfig fields,
like a transformers model's file of that name: what `caption` and `eval` run when told no strategy).

`config.json` carries the published SupraVL-Nano keys (D_MODEL, N_HEADS, N_LAYERS, D_FF,
VIS_CH, N_VIS, VOCAB_SIZE, MAX_SEQ, IMG_SIZE, bos_token_id, eos_token_id) so the release's
own loading code reads a picovlm checkpoint, plus the full picovlm config under
`picovlm_config`. A folder with only the published keys (the released model) loads too.

Weights are safetensors only: nothing is ever unpickled. The tied lm_head is stored once,
as `tok_emb.weight`, exactly as the published loader expects (it re-ties after loading).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from picovlm import __version__
from picovlm.chat import IMAGE_TOKEN
from picovlm.config import VLMConfig
from picovlm.errors import UserError, first_line
from picovlm.generate import GenerationConfig
from picovlm.io import atomic_dir, check_state_dict, find_complete_dir
from picovlm.models.mobilenet_v2 import FEATURE_CHANNELS
from picovlm.models.nanovlm import NanoVLM
from picovlm.models.supravl import SupraVL
from picovlm.neighbours import INDEX_FILE, CaptionIndex, rebuild_hint, weights_fingerprint
from picovlm.tokenizer import CaptionTokenizer

WEIGHTS, CONFIG, TOKENIZER, CARD = "model.safetensors", "config.json", "tokenizer.json", "README.md"
GENERATION = "generation_config.json"  # a captioner's own decoding, when it has one
# INDEX_FILE (neighbours.safetensors): a captioner's index of training captions, when it has one
CHECKPOINT_FILES = (WEIGHTS, CONFIG, TOKENIZER, CARD, GENERATION, INDEX_FILE)  # what the Hub gets and gives back
SEED_KEYS = ("D_MODEL", "N_HEADS", "N_LAYERS", "D_FF", "VIS_CH", "N_VIS", "VOCAB_SIZE", "MAX_SEQ", "IMG_SIZE")


def config_to_json(cfg: VLMConfig) -> dict[str, Any]:
    if cfg.family == "nanovlm":  # no published format to follow: picovlm's own config
        return {"model_type": "nanovlm", "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                "pad_token_id": cfg.pad_token_id, "picovlm_version": __version__, "picovlm_config": cfg.to_dict()}
    return {
        "model_type": "supravl",
        "D_MODEL": cfg.lm_hidden_dim,
        "N_HEADS": cfg.lm_n_heads,
        "N_LAYERS": cfg.lm_n_blocks,
        "D_FF": cfg.lm_inter_dim,
        "VIS_CH": FEATURE_CHANNELS if cfg.vision_type == "mobilenet_v2" else cfg.cnn_channels[-1],
        "N_VIS": cfg.n_vis_tokens,
        "VOCAB_SIZE": cfg.lm_vocab_size,
        "MAX_SEQ": cfg.lm_max_text_len,
        "IMG_SIZE": cfg.img_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "picovlm_version": __version__,
        "picovlm_config": cfg.to_dict(),
    }


def config_from_json(d: Any, source: str = CONFIG) -> VLMConfig:
    """picovlm's own config if present, else the published keys (channels VIS_CH/4, /2, /1)."""
    if not isinstance(d, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(d).__name__}")
    if "picovlm_config" in d:
        try:
            return VLMConfig.from_dict(d["picovlm_config"])
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    missing = [k for k in SEED_KEYS if k not in d]
    if missing:
        raise UserError(f"{source}: missing key(s) {missing}; a SupraVL config needs {list(SEED_KEYS)}")
    for k in SEED_KEYS:
        if not isinstance(d[k], int) or isinstance(d[k], bool):
            raise UserError(f"{source}: {k} must be an integer, got {d[k]!r}")
    grid = math.isqrt(d["N_VIS"])
    if grid * grid != d["N_VIS"]:
        raise UserError(f"{source}: N_VIS={d['N_VIS']} is not a square number of grid cells")
    vis = d["VIS_CH"]
    return VLMConfig.from_dict({
        "img_size": d["IMG_SIZE"], "cnn_channels": [vis // 4, vis // 2, vis], "cnn_grid": grid,
        "lm_hidden_dim": d["D_MODEL"], "lm_n_heads": d["N_HEADS"], "lm_n_blocks": d["N_LAYERS"],
        "lm_inter_dim": d["D_FF"], "lm_vocab_size": d["VOCAB_SIZE"], "lm_max_text_len": d["MAX_SEQ"],
        "bos_token_id": d.get("bos_token_id", 1), "eos_token_id": d.get("eos_token_id", 2),
    })


def tied_head_key(model: SupraVL | NanoVLM) -> str | None:
    """The state-dict key of a head tied to the token embedding (stored once, as the embedding)."""
    if not model.cfg.lm_tie_weights:
        return None
    return "decoder.lm_head.weight" if isinstance(model, NanoVLM) else "lm_head.weight"


def model_state(model: SupraVL | NanoVLM) -> dict[str, torch.Tensor]:
    """State dict as saved: contiguous CPU tensors, the tied head stored once (as the embedding)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if tied_head_key(model):
        state.pop(tied_head_key(model))
    return state


def save_pretrained(model: SupraVL | NanoVLM, out_dir: str | Path, metrics: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a complete checkpoint folder atomically (a crash leaves the previous one intact)."""
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer attached; set model.tokenizer before saving")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(model_state(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(config_to_json(model.cfg), indent=2) + "\n")
        model.tokenizer.save(str(tmp / TOKENIZER))  # beside the weights, always
        card = nanovlm_card(model, metrics or {}) if isinstance(model, NanoVLM) else model_card(model, metrics or {})
        (tmp / CARD).write_text(card)
        if getattr(model, "generation", None):
            (tmp / GENERATION).write_text(json.dumps(model.generation, indent=2) + "\n")
        index = getattr(model, "neighbours", None)
        if index is not None and index.fingerprint == weights_fingerprint(tmp / WEIGHTS):
            (tmp / INDEX_FILE).write_bytes(index.to_bytes())  # kept only while it fits these weights
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def resolve_model_dir(dir_or_repo: str | Path) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded (and cached) by huggingface_hub."""
    path = find_complete_dir(dir_or_repo)
    if path.is_dir():
        return path
    text = str(dir_or_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise UserError(f"model folder not found: {text}; pass a folder written by 'picovlm train' "
                        f"or a Hub repo id like 'user/model'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=list(CHECKPOINT_FILES)))
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        reason = first_line(e)
        raise UserError(f"cannot download {text!r} from the Hugging Face Hub ({reason}); "
                        f"check the repo id and your connection, or pass a local folder") from None


def from_pretrained(dir_or_repo: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, read_neighbours: bool = True) -> SupraVL | NanoVLM:
    """Load a checkpoint folder or Hub repo; the tokenizer is attached as `model.tokenizer`.

    The weights file holds every tensor, a frozen pretrained backbone's included, so loading
    never needs the backbone's original ImageNet file. The model is built on the meta device and
    takes the file's tensors as they are (cast to `dtype` if given), so loading needs memory for
    one copy of the weights, not two, and no time initialising weights the file replaces.
    """
    path = resolve_model_dir(dir_or_repo)
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise UserError(f"{path} has no {name}; a picovlm checkpoint folder holds "
                            f"{WEIGHTS}, {CONFIG} and {TOKENIZER}")
    try:
        config_json = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / CONFIG} is not valid JSON ({e}); restore it from the saved checkpoint") from None
    cfg = config_from_json(config_json, str(path / CONFIG))
    if cfg.family == "nanovlm":
        return _nanovlm_from_folder(cfg, path, dtype).to(device).eval()
    with torch.device("meta"):
        model = SupraVL(cfg)
    load_weights(model, path / WEIGHTS, dtype)
    tokenizer = CaptionTokenizer.from_file(path / TOKENIZER)
    if tokenizer.vocab_size > cfg.lm_vocab_size:
        raise UserError(f"{path / TOKENIZER} has {tokenizer.vocab_size} tokens but the model only "
                        f"{cfg.lm_vocab_size}; the folder mixes files of different models")
    model.tokenizer = tokenizer
    model.generation = read_generation(path / GENERATION)
    if read_neighbours and (path / INDEX_FILE).is_file():  # (off: to rebuild a stale or broken one)
        model.neighbours = read_index(path, cfg)
    return model.to(device).eval()


def read_index(path: Path, cfg: VLMConfig) -> CaptionIndex:
    """A checkpoint folder's caption index, checked against its weights and config."""
    index = CaptionIndex.load(path / INDEX_FILE)
    fix = rebuild_hint(path)
    if index.fingerprint != weights_fingerprint(path / WEIGHTS):
        raise UserError(f"{path / INDEX_FILE} was built with other weights than {path / WEIGHTS}; {fix}")
    too_large = len(index.tokens) and int(index.tokens.max()) >= cfg.lm_vocab_size  # token ids the model lacks
    if index.features.shape[1] != cfg.lm_hidden_dim or too_large:
        raise UserError(f"{path / INDEX_FILE} does not match the model's width or vocabulary; {fix}")
    return index


def read_generation(path: Path) -> dict[str, Any]:
    """A checkpoint's own decoding settings (checked), or {} when it has no generation_config.json."""
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); fix it, or delete it to decode with "
                        f"picovlm's defaults") from None
    GenerationConfig.from_dict(settings, str(path))
    return settings


def _nanovlm_from_folder(cfg: VLMConfig, path: Path, dtype: torch.dtype | None) -> NanoVLM:
    from tokenizers import Tokenizer

    with torch.device("meta"):
        model = NanoVLM(cfg)
    load_weights(model, path / WEIGHTS, dtype)
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise UserError(f"cannot read tokenizer {path / TOKENIZER}: {first_line(e)}") from None
    if tokenizer.token_to_id(IMAGE_TOKEN) != model.image_token_id:
        raise UserError(f"{path / TOKENIZER}: {IMAGE_TOKEN} must have id {model.image_token_id} (lm_vocab_size); "
                        f"the folder mixes files of different models")
    model.tokenizer = tokenizer
    return model


def _read_tensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, floating-point ones cast to dtype one at a time (so a
    bf16 load never holds the whole fp32 file in memory)."""
    state = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(key)
            state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def load_weights(model: SupraVL | NanoVLM, weights_path: Path, dtype: torch.dtype | None = None) -> None:
    """Put safetensors weights into a model (built on the meta device or not) with exact key and
    shape checks (one-line errors); floating-point tensors are cast to dtype if given."""
    try:
        state = _read_tensors(weights_path, dtype)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read weights {weights_path}: {e}; the file is damaged or not "
                        f"safetensors (picovlm never loads pickled weights)") from None
    expected = model.state_dict()
    # The published model keeps its causal-mask buffers in the state dict; they are derived.
    state = {k: v for k, v in state.items() if not (k.endswith("attn.mask") and k not in expected)}
    check_state_dict(expected, state, str(weights_path), {tied_head_key(model)} if tied_head_key(model) else set())
    model.load_state_dict(state, strict=False, assign=True)  # the file's tensors become the parameters
    if model.cfg.lm_tie_weights:  # the saved embedding is the head too
        head_owner = model.decoder if isinstance(model, NanoVLM) else model
        head_owner.lm_head.weight = head_owner.tok_emb.weight


def vision_summary(cfg: VLMConfig) -> str:
    """One table cell describing the visual encoder."""
    tokens = f"pooled to {cfg.cnn_grid}x{cfg.cnn_grid} = {cfg.n_vis_tokens} tokens"
    if cfg.vision_type == "mobilenet_v2":
        return (f"MobileNetV2 (ImageNet, torchvision weights), frozen, {tokens}, "
                f"{cfg.vision_proj} projector {FEATURE_CHANNELS} -> {cfg.lm_hidden_dim}")
    return (f"{len(cfg.cnn_channels)} x Conv3x3/2-BN-ReLU {list(cfg.cnn_channels)}, {tokens}, "
            f"Linear {cfg.cnn_channels[-1]} -> {cfg.lm_hidden_dim}")


def model_card(model: SupraVL, metrics: dict[str, Any]) -> str:
    cfg, counts = model.cfg, model.param_counts()
    rows = "\n".join(f"| {name} | {n:,} |" for name, n in counts["components"].items())
    metric_rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (none recorded) | |"
    settings = ", ".join(f"{k}={v}" for k, v in model.generation.items())
    decoding = (f"{settings} ({GENERATION}); name a strategy to decode otherwise" if settings
                else "beam search, width 3 (picovlm's default)")
    return f"""---
license: apache-2.0
library_name: picovlm
tags: [image-to-text, vision-language-model, picovlm]
---

# picovlm SupraVL model

A tiny image-captioning model trained with picovlm (CNN encoder + GPT-2 style decoder,
prefix concatenation). Load it with `picovlm.load("<this folder or repo id>")`.

## Architecture

| part | setting |
| --- | --- |
| visual encoder | {vision_summary(cfg)} |
| decoder | GPT-2 style, {cfg.lm_n_blocks} layers, d={cfg.lm_hidden_dim}, {cfg.lm_n_heads} heads, \
MLP {cfg.lm_inter_dim} |
| context | {cfg.n_vis_tokens} visual + {cfg.lm_max_text_len} text = {cfg.context_len} positions |
| vocabulary | {cfg.lm_vocab_size} byte-level BPE tokens |
| input | {cfg.img_size}x{cfg.img_size} RGB, ImageNet mean/std |
| decoding | {decoding} |

## Parameters

| component | parameters |
| --- | --- |
{rows}

Unique parameters: {counts['params_unique']:,} ({counts['trainable']:,} trained, {counts['frozen']:,} frozen).
Counting the tied lm_head a second time: {counts['params_with_tied_head']:,}.

## Training data and metrics

| metric | value |
| --- | --- |
{metric_rows}
"""


def nanovlm_card(model: NanoVLM, metrics: dict[str, Any]) -> str:
    cfg, counts = model.cfg, model.param_counts()
    metric_rows = "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) or "| (none recorded) | |"
    return f"""---
license: apache-2.0
library_name: picovlm
tags: [image-text-to-text, vision-language-model, picovlm]
---

# picovlm NanoVLM model

A vision-language model built with picovlm: a SigLIP-style ViT, a pixel-shuffle projector and a
Llama-style decoder, the image embeddings taking the places of {IMAGE_TOKEN} tokens in the text.
Load it with `picovlm.load("<this folder or repo id>")`; `tokenizer.json` holds the chat template's
tokens and {IMAGE_TOKEN} (id {model.image_token_id}).

| part | setting | parameters |
| --- | --- | --- |
| vision encoder | ViT {cfg.vit_n_blocks} blocks, d={cfg.vit_hidden_dim}, {cfg.vit_n_heads} heads, patch \
{cfg.vit_patch_size}, {cfg.vit_img_size}px | {counts['vit_params']:,} |
| projector | pixel shuffle {cfg.mp_pixel_shuffle_factor} + Linear, {model.tokens_per_image} tokens per image \
| {counts['mp_params']:,} |
| decoder | Llama-style, {cfg.lm_n_blocks} blocks, d={cfg.lm_hidden_dim}, {cfg.lm_n_heads} heads \
({cfg.lm_n_kv_heads} KV), vocabulary {cfg.lm_vocab_size} | {counts['lm_params']:,} |

Unique parameters: {counts['params_unique']:,} (the head tied to the embedding counted once).

| metric | value |
| --- | --- |
{metric_rows}
"""
