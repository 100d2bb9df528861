"""The published SupraVL-Nano-900k inference code, re-implemented as a compatibility reference.

The release post's quick start defines its model with these module names and loads
`model.safetensors` with `load_state_dict(strict=False)`, re-tying lm_head to tok_emb, then
captions with a list-based beam search that recomputes the whole sequence every step. This
file rebuilds that behaviour independently (it is test code, not part of picovlm) so the
tests can check that a picovlm checkpoint works in the published code unchanged.

It is also the straightforward baseline of the speed benchmarks: manual softmax attention, fp32,
and decoding that recomputes the whole sequence at every step, one beam (or image) at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, d: int, heads: int, total_pos: int):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.heads = heads
        self.register_buffer("mask", torch.tril(torch.ones(total_pos, total_pos))[None, None])

    def forward(self, x):
        b, t, c = x.shape
        hs = c // self.heads
        q, k, v = (z.view(b, t, self.heads, hs).transpose(1, 2) for z in self.qkv(x).split(c, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        scores = scores.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf"))
        out = F.softmax(scores, dim=-1) @ v
        return self.proj(out.transpose(1, 2).contiguous().view(b, t, c))


class RefMLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, d: int, heads: int, d_ff: int, total_pos: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = RefAttention(d, heads, total_pos)
        self.mlp = RefMLP(d, d_ff)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.BatchNorm2d(c_out), nn.ReLU(True))


class RefEncoder(nn.Module):
    def __init__(self, vis_ch: int, n_vis: int, d: int):
        super().__init__()
        self.conv1 = _stage(3, vis_ch // 4)
        self.conv2 = _stage(vis_ch // 4, vis_ch // 2)
        self.conv3 = _stage(vis_ch // 2, vis_ch)
        side = int(n_vis**0.5)
        self.pool = nn.AdaptiveAvgPool2d((side, side))
        self.proj = nn.Linear(vis_ch, d)

    def forward(self, x):
        x = self.pool(self.conv3(self.conv2(self.conv1(x))))
        return self.proj(x.flatten(2).transpose(1, 2))


class RefVLM(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, self.n_vis = cfg["D_MODEL"], cfg["N_VIS"]
        total = cfg["N_VIS"] + cfg["MAX_SEQ"]
        self.vis_enc = RefEncoder(cfg["VIS_CH"], cfg["N_VIS"], d)
        self.tok_emb = nn.Embedding(cfg["VOCAB_SIZE"], d)
        self.pos_emb = nn.Embedding(total, d)
        self.blocks = nn.ModuleList(RefBlock(d, cfg["N_HEADS"], cfg["D_FF"], total) for _ in range(cfg["N_LAYERS"]))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg["VOCAB_SIZE"], bias=False)

    def forward(self, img_tokens, ids):
        x = torch.cat([img_tokens, self.tok_emb(ids)], dim=1)
        x = x + self.pos_emb(torch.arange(x.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def load_published(folder: Path) -> tuple[RefVLM, Tokenizer, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    model = RefVLM(cfg)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    model.lm_head.weight = model.tok_emb.weight
    return model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json")), cfg


def preprocess(path: Path, cfg: dict) -> torch.Tensor:
    """Resize((S, S)) on a PIL image (bilinear), to tensor in [0, 1], ImageNet normalise."""
    size = cfg["IMG_SIZE"]
    im = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((x - mean) / std)[None]


@torch.no_grad()
def generate_beam(model: RefVLM, tokenizer: Tokenizer, cfg: dict, img: torch.Tensor,
                  beam_width: int = 3, max_new: int = 48) -> str:
    bos, eos = cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2)
    img_tokens = model.vis_enc(img)
    beams = [(0.0, [bos])]
    for _ in range(max_new):
        candidates = []
        for score, seq in beams:
            if seq[-1] == eos:
                candidates.append((score, seq))
                continue
            logits = model(img_tokens, torch.tensor([seq]))
            lprobs = F.log_softmax(logits[0, model.n_vis + len(seq) - 1], dim=-1)
            top = torch.topk(lprobs, beam_width)
            for lp, tok in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((score + lp, seq + [tok]))
        beams = sorted(candidates, key=lambda c: c[0], reverse=True)[:beam_width]
        if all(seq[-1] == eos for _, seq in beams):
            break
    return tokenizer.decode([t for t in beams[0][1] if t not in (bos, eos)])


@torch.no_grad()
def generate_greedy(model: RefVLM, tokenizer: Tokenizer, cfg: dict, img: torch.Tensor, max_new: int = 48) -> str:
    """Greedy decoding the straightforward way: the whole sequence recomputed for every token."""
    bos, eos = cfg.get("bos_token_id", 1), cfg.get("eos_token_id", 2)
    img_tokens = model.vis_enc(img)
    seq = [bos]
    for _ in range(max_new):
        logits = model(img_tokens, torch.tensor([seq]))
        nxt = int(logits[0, model.n_vis + len(seq) - 1].argmax())
        seq.append(nxt)
        if nxt == eos:
            break
    return tokenizer.decode([t for t in seq if t not in (bos, eos)])
