"""The model: parameter counts as published, shapes, causality, loss masking, tied weights."""

from __future__ import annotations

import torch

from picovlm.config import supravl_nano
from picovlm.models.supravl import IGNORE_INDEX, SupraVL
from tests.conftest import tiny_config


def test_supravl_nano_parameter_counts() -> None:
    counts = SupraVL(supravl_nano()).param_counts()
    assert counts["components"] == {"vis_enc": 32_128, "tok_emb": 262_144, "pos_emb": 8_192,
                                    "blocks": 395_904, "ln_f": 256, "lm_head": 262_144}
    assert counts["params_unique"] == 698_624
    assert counts["params_with_tied_head"] == 960_768  # the release's "~900k" counts the head twice


def test_forward_shapes_and_tied_head() -> None:
    model = SupraVL(supravl_nano())
    assert model.lm_head.weight is model.tok_emb.weight
    images = torch.randn(2, 3, 112, 112)
    assert model.encode_images(images).shape == (2, 16, 128)
    logits, loss = model(images, torch.randint(0, 2048, (2, 48)), torch.randint(0, 2048, (2, 48)))
    assert logits.shape == (2, 48, 2048) and loss.ndim == 0


def test_text_is_causal_and_sees_the_image() -> None:
    torch.manual_seed(0)
    model = SupraVL(tiny_config()).eval()
    images, ids = torch.randn(1, 3, 32, 32), torch.randint(3, 300, (1, 8))
    logits, _ = model(images, ids)
    changed = ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 300
    logits2, _ = model(images, changed)
    assert torch.allclose(logits[:, :5], logits2[:, :5], atol=1e-6)  # the past ignores the future
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:])
    logits3, _ = model(torch.randn(1, 3, 32, 32), ids)
    assert not torch.allclose(logits[:, 0], logits3[:, 0])  # the first word depends on the image


def test_loss_ignores_padding_targets() -> None:
    torch.manual_seed(0)
    model = SupraVL(tiny_config()).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(3, 300, (2, 6))
    targets = torch.randint(3, 300, (2, 6))
    padded = targets.clone()
    padded[:, 4:] = IGNORE_INDEX
    logits, loss = model(images, ids, padded)
    manual = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, 300), targets[:, :4].reshape(-1))
    assert torch.allclose(loss, manual, atol=1e-6)
    # Training's path runs the head only on real targets: same loss, same gradients.
    model.zero_grad()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    none, loss_only = model(images, ids, padded, loss_only=True)
    loss_only.backward()
    assert none is None and torch.allclose(loss, loss_only, atol=1e-6)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))
