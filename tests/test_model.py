"""The model: parameter counts as published, shapes, causality, loss masking, tied weights."""

from __future__ import annotations

import pytest
import torch

from picovlm.config import supravl_nano
from picovlm.errors import UserError
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


def test_residual_cnn_blocks_keep_shapes_and_add_their_parameters() -> None:
    plain, deep = SupraVL(tiny_config()), SupraVL(tiny_config(cnn_res_blocks=2))
    # per stage of C channels and per block: depthwise 3x3 (9C), 1x1 (C*C), two batch norms (4C)
    extra = sum(2 * (9 * c + c * c + 4 * c) for c in (4, 8, 16))
    assert deep.param_counts()["params_unique"] - plain.param_counts()["params_unique"] == extra
    assert [name for name, _ in deep.vis_enc.named_children()][:3] == ["conv1", "res1", "conv2"]
    assert not any(name.startswith("res") for name, _ in plain.vis_enc.named_children())  # published keys
    images = torch.randn(2, 3, 32, 32)
    tokens = deep.encode_images(images)
    assert tokens.shape == plain.encode_images(images).shape == (2, 4, 32)
    with torch.no_grad():
        deep.vis_enc.res3[1].pw.weight.mul_(2)
    assert not torch.allclose(deep.encode_images(images), tokens)  # the forward pass runs the blocks
    torch.manual_seed(0)
    stage = deep.vis_enc.res1[0]
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        stage.bn2.weight.zero_()  # the branch adds nothing: the block is ReLU(x)
        torch.testing.assert_close(stage(x), torch.relu(x))
        stage.bn2.weight.fill_(1.0)
        assert not torch.allclose(stage(x), torch.relu(x))


def test_cnn_feature_dropout_in_training_only() -> None:
    torch.manual_seed(0)
    model = SupraVL(tiny_config(vision_dropout=0.5))
    images = torch.randn(2, 3, 32, 32)
    dropout = model.vis_enc.feature_dropout

    def tokens_with_and_without_dropout() -> tuple[torch.Tensor, torch.Tensor]:
        dropout.p = 0.5
        dropped = model.encode_images(images)
        dropout.p = 0.0
        return dropped, model.encode_images(images)

    model.eval()
    torch.testing.assert_close(*tokens_with_and_without_dropout())
    model.train()  # (batch norm uses batch statistics in both calls alike)
    dropped, kept = tokens_with_and_without_dropout()
    assert not torch.allclose(dropped, kept)
    with pytest.raises(UserError, match="cnn_res_blocks"):
        tiny_config(cnn_res_blocks=-1).validate()
    with pytest.raises(UserError, match="vision_dropout"):
        tiny_config(vision_dropout=1.0).validate()
