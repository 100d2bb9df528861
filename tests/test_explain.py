"""Attention maps are the model's real attention weights, per word, and they follow the image."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import picovlm
from picovlm.cli import main
from picovlm.data.flickr8k import load_split
from picovlm.explain import _group_words, attention_over_image, explain
from picovlm.generate import GenerationConfig, generate, preprocess


@pytest.fixture(scope="module")
def model(trained_run: Path):
    return picovlm.load(str(trained_run / "best"))


def _images(shapes_dir: Path, n: int = 2) -> list[Path]:
    dev = load_split(shapes_dir, "dev")
    return [dev.image_dir / name for name in dev.names[:n]]


def test_recording_does_not_change_the_logits(model, shapes_dir: Path) -> None:
    pixels = preprocess(_images(shapes_dir), model)
    ids = torch.tensor([[1, 40, 50, 60]] * 2)
    plain, _ = model(pixels, ids)
    for block in model.blocks:
        block.attn.record_attention = True
    try:
        recorded, _ = model(pixels, ids)
    finally:
        for block in model.blocks:
            block.attn.record_attention = False
    assert torch.allclose(plain, recorded, atol=1e-5)


def test_maps_are_the_first_layers_softmax_recomputed_by_hand(model, shapes_dir: Path) -> None:
    pixels = preprocess(_images(shapes_dir, 1), model)
    token_ids = generate(model, pixels, GenerationConfig(strategy="greedy"))[0]
    attention = attention_over_image(model, pixels, token_ids)  # (n, L, H, P)
    P, H = model.cfg.n_vis_tokens, model.cfg.lm_n_heads
    with torch.no_grad():  # layer 0 by hand: embeddings -> ln1 -> q, k -> causal softmax
        x = torch.cat([model.encode_images(pixels), model.tok_emb(torch.tensor([[1, *token_ids[:-1]]]))], dim=1)
        x = x + model.pos_emb(torch.arange(x.shape[1]))
        attn = model.blocks[0].attn
        q, k, _ = attn.qkv(model.blocks[0].ln1(x)).split(model.cfg.lm_hidden_dim, dim=-1)
        T, hd = x.shape[1], model.cfg.lm_hidden_dim // H
        q, k = (t.view(1, T, H, hd).transpose(1, 2) for t in (q, k))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        expected = scores[0, :, P:P + len(token_ids), :P].permute(1, 0, 2)  # (n, H, P)
    assert torch.allclose(attention[:, 0], expected, atol=1e-5)


def test_word_maps_sum_to_the_attention_mass_on_the_image_and_follow_it(model, shapes_dir: Path) -> None:
    first, second = _images(shapes_dir)
    expl = explain(model, first)
    assert len(expl.words) == len(expl.caption.split()) and " ".join(expl.words) == expl.caption
    grid = model.cfg.cnn_grid
    assert expl.maps.shape == (len(expl.words), model.cfg.lm_n_blocks, model.cfg.lm_n_heads, grid, grid)
    mass = expl.maps.sum(dim=(-2, -1))
    assert (mass > 0).all() and (mass <= 1 + 1e-5).all()
    pixels = preprocess([first], model)
    token_ids = generate(model, pixels, GenerationConfig(strategy="greedy"))[0]
    per_token_mass = attention_over_image(model, pixels, token_ids).sum(-1)  # (n_tokens, L, H)
    expected = torch.stack([per_token_mass[g].mean(dim=0) for g in _group_words(model, token_ids)])
    assert torch.allclose(mass, expected, atol=1e-5)  # a word's map: the mean of its tokens' rows
    other = explain(model, second)
    assert not torch.allclose(expl.mean_maps[0], other.mean_maps[0])


def test_explain_cli_writes_a_png(tmp_path: Path, trained_run: Path, shapes_dir: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    image = str(_images(shapes_dir, 1)[0])
    assert main(["explain", image, "--model", str(trained_run / "best"), "--out", str(tmp_path / "maps.png"),
                 "--per-layer"]) == 0
    assert (tmp_path / "maps.png").read_bytes()[:4] == b"\x89PNG"
    assert "attention maps" in capsys.readouterr().out
