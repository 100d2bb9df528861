"""Training: it learns, writes its artefacts, resumes exactly, and fails clearly."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import picovlm.train as train_mod
from picovlm.config import TrainConfig
from picovlm.data.batches import words_of_images
from picovlm.errors import UserError
from picovlm.models.supravl import IGNORE_INDEX, SupraVL
from picovlm.train import get_lr, train
from tests.conftest import ctrl_c_during_step, tiny_config
from tests.test_nanovlm import tiny_nanovlm


def test_trained_run_learns_and_writes_everything(trained_run: Path) -> None:
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 40 and min(val) < 0.5 * val[0]
    for name in ("loss.png", "train_config.json", "best/model.safetensors", "best/config.json",
                 "best/tokenizer.json", "best/README.md", "last/training_state.safetensors"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_schedule_warms_up_then_decays_to_min() -> None:
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [get_lr(s, 100, tc) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(1e-4)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_interrupted_run_resumes_to_identical_weights(tmp_path: Path, shapes_dir: Path) -> None:
    cfg = tiny_config(lm_dropout=0.1)  # dropout and augmentation make the RNG state matter
    tc = TrainConfig(epochs=2, batch_size=32, lr=2e-3, warmup_steps=3, augment=True, seed=5, ema_decay=0.9)
    train(cfg, tc, tmp_path / "full", data_dir=shapes_dir, progress_bar=False)

    # Ctrl-C in the middle of the second epoch
    with ctrl_c_during_step(train_mod, 11), pytest.raises(UserError, match="interrupted after step 12.*--resume"):
        train(cfg, tc, tmp_path / "cut", data_dir=shapes_dir, progress_bar=False)
    state = json.loads((tmp_path / "cut" / "last" / "training_state.json").read_text())
    assert state["progress"]["step"] == 12  # the step under way was finished, then saved
    summary = train(cfg, tc, tmp_path / "cut", data_dir=shapes_dir, resume=True, progress_bar=False)
    assert summary["steps"] == 16
    for folder in ("last", "best"):  # best/ holds the weight average, which must resume too
        full, resumed = _weights(tmp_path / "full" / folder), _weights(tmp_path / "cut" / folder)
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), (folder, k)


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path: Path, trained_run: Path,
                                                           shapes_dir: Path) -> None:
    with pytest.raises(UserError, match="--resume"):
        train(tiny_config(), TrainConfig(epochs=1), trained_run, data_dir=shapes_dir, progress_bar=False)
    with pytest.raises(UserError, match="nothing to resume"):
        train(tiny_config(), TrainConfig(epochs=1), tmp_path / "new", data_dir=shapes_dir, resume=True,
              progress_bar=False)


def test_nan_loss_stops_with_advice(tmp_path: Path, shapes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_forward = SupraVL.forward
    calls = {"n": 0}

    def forward_that_diverges(self, images, input_ids, targets=None, **kwargs):
        logits, loss = real_forward(self, images, input_ids, targets, **kwargs)
        calls["n"] += 1
        return logits, loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(SupraVL, "forward", forward_that_diverges)
    with pytest.raises(UserError, match="step 2.*lower the learning rate"):
        train(tiny_config(), TrainConfig(epochs=1, batch_size=32), tmp_path / "nan", data_dir=shapes_dir,
              progress_bar=False)


def test_fp16_on_cpu_is_refused(tmp_path: Path, shapes_dir: Path) -> None:
    with pytest.raises(UserError, match="fp16"):
        train(tiny_config(), TrainConfig(precision="fp16"), tmp_path / "x", data_dir=shapes_dir, device="cpu")


def test_bf16_autocast_trains(tmp_path: Path, shapes_dir: Path) -> None:
    summary = train(tiny_config(), TrainConfig(epochs=1, batch_size=32, precision="bf16"), tmp_path / "bf16",
                    data_dir=shapes_dir, progress_bar=False)
    assert summary["precision"] == "bf16" and summary["best_val_loss"] < 6.0


def test_second_ctrl_c_stops_at_once_without_saving_a_torn_state(tmp_path: Path, shapes_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_get_lr = train_mod.get_lr

    def double_ctrl_c(step: int, total: int, tc: TrainConfig) -> float:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(step, total, tc)

    monkeypatch.setattr(train_mod, "get_lr", double_ctrl_c)
    with pytest.raises(UserError, match="stopped at once"):
        train(tiny_config(), TrainConfig(epochs=1, batch_size=16), tmp_path / "x", data_dir=shapes_dir,
              progress_bar=False)
    assert not (tmp_path / "x" / "last").exists()  # nothing half-done was written


def test_compiled_training_saves_plain_checkpoints(tmp_path: Path, shapes_dir: Path) -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    tc = TrainConfig(max_steps=3, batch_size=16, warmup_steps=1, compile=True, precision="fp32")
    summary = train(tiny_config(), tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    assert counters["stats"]["unique_graphs"] > 0  # the steps really ran compiled
    weights = _weights(tmp_path / "run" / "last")
    assert summary["steps"] == 3 and not any("_orig_mod" in k for k in weights)
    assert torch.isfinite(torch.tensor(summary["train_loss"]))


def test_fp16_step_with_grad_scaler_skips_overflowing_steps() -> None:
    """The CUDA fp16 path (autocast + GradScaler), exercised on CPU, where both exist too."""
    from picovlm.train import configure_optimizer, train_step

    torch.manual_seed(0)
    model = SupraVL(tiny_config())
    tc = TrainConfig(batch_size=4)
    opt = configure_optimizer(model, tc, "cpu")
    batch = (torch.randn(4, 3, 32, 32), torch.randint(3, 300, (4, 6)), torch.randint(3, 300, (4, 6)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, opt, scaler, batch, tc, "fp16", "cpu", step=0)
    assert math.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # A scale so large that fp16 gradients overflow: the scaler must skip the update and back off.
    overflowing = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt, overflowing, batch, tc, "fp16", "cpu", step=1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert overflowing.get_scale() < 2.0**60


def test_precision_choice_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA choices (exercised without a GPU): torchrun gives devices such as cuda:1."""
    from picovlm.train import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda:1") == "fp16"  # then train() adds a GradScaler
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("fp16", "cuda:0") == "fp16" and resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(UserError, match="fp16 training needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")


def test_a_word_level_captioner_trains_saves_and_captions(tmp_path: Path, shapes_dir: Path) -> None:
    from picovlm.checkpoint import from_pretrained

    cfg = tiny_config(lm_tokenizer="word", lm_vocab_size=64)
    train(cfg, TrainConfig(epochs=1, batch_size=32), tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    model = from_pretrained(tmp_path / "run" / "best")
    assert model.cfg.lm_tokenizer == "word" and model.tokenizer.tokenizer.id_to_token(3) == "<unk>"
    words = model.tokenizer.tokenizer.get_vocab()
    assert all(" " not in w for w in words) and "circle" in words  # whole words of the shapes captions
    with pytest.raises(UserError, match="lm_tokenizer"):
        tiny_config(lm_tokenizer="chars").validate()


def test_weight_ema_averages_and_puts_the_weights_back() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    ema = train_mod.WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(0.0)
    start = ema.shadow["weight"].clone()
    ema.update(model)  # d = min(0.5, 1/10): the first steps follow the weights closely
    torch.testing.assert_close(ema.shadow["weight"], start * 0.1)
    for _ in range(20):
        ema.update(model)
    assert ema.steps == 21
    with ema.applied(model):
        torch.testing.assert_close(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, torch.zeros(1, 2))


def test_best_checkpoint_holds_the_weight_average(tmp_path: Path, shapes_dir: Path, trained_run: Path) -> None:
    tc = TrainConfig(epochs=1, batch_size=32, lr=3e-3, ema_decay=0.8)
    train(tiny_config(), tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    with pytest.raises(UserError, match="without a weight average"):  # trained_run had no --ema
        train(tiny_config(), TrainConfig(epochs=41, ema_decay=0.9), trained_run, data_dir=shapes_dir,
              resume=True, progress_bar=False)
    best, last = _weights(tmp_path / "run" / "best"), _weights(tmp_path / "run" / "last")
    state = load_file(str(tmp_path / "run" / "last" / "training_state.safetensors"))
    averaged = [name for name in best if f"ema.{name}" in state]
    assert len(averaged) > 10
    for name in averaged:  # trained tensors: the average, not the last step's
        assert torch.equal(best[name], state[f"ema.{name}"]) and not torch.equal(best[name], last[name]), name


def _epoch_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r]


def test_best_can_be_selected_on_greedy_dev_cider(tmp_path: Path, shapes_dir: Path) -> None:
    from picovlm.checkpoint import from_pretrained
    from picovlm.data.prepare import prepare_data
    from picovlm.scst import dev_cider

    tc = TrainConfig(epochs=12, batch_size=32, lr=3e-3, warmup_steps=3, select_on="cider")
    summary = train(tiny_config(), tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    ciders = [r["dev_cider"] for r in _epoch_rows(tmp_path / "run")]
    assert len(ciders) == 12 and summary["best_dev_cider"] == max(ciders) > 0
    # best/ holds the weights that scored it: caption the dev split again with them
    best = from_pretrained(tmp_path / "run" / "best")
    dev = prepare_data(shapes_dir, best.cfg, best.tokenizer, progress=False).dev
    assert dev_cider(best, dev, "cpu", summary["precision"]) == pytest.approx(max(ciders), abs=1e-6)
    assert f"| dev_cider | {round(max(ciders), 4)} |" in (tmp_path / "run" / "best" / "README.md").read_text()


def test_cider_selection_keeps_the_best_scoring_epoch_not_the_lowest_loss(
        tmp_path: Path, shapes_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([0.1, 0.5, 0.3, 0.2])  # the second epoch captions best
    monkeypatch.setattr("picovlm.scst.dev_cider", lambda *args, **kwargs: next(scripted))
    tc = TrainConfig(epochs=4, batch_size=32, lr=3e-3, warmup_steps=3, select_on="cider")
    summary = train(tiny_config(), tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    rows = _epoch_rows(tmp_path / "run")
    assert [r["dev_cider"] for r in rows] == [0.1, 0.5, 0.3, 0.2] and summary["best_dev_cider"] == 0.5
    assert min(r["val_loss"] for r in rows) < rows[1]["val_loss"]  # loss alone would keep another epoch
    card = (tmp_path / "run" / "best" / "README.md").read_text()
    assert f"| step | {rows[1]['step']} |" in card and "| dev_cider | 0.5 |" in card
    best, last = _weights(tmp_path / "run" / "best"), _weights(tmp_path / "run" / "last")
    assert any(not torch.equal(best[name], last[name]) for name in best)


def test_cider_selection_needs_a_captioner_with_a_dev_split(tmp_path: Path) -> None:
    (tmp_path / "shard-000000.tar").write_bytes(b"")  # a folder of shards is streamed: no dev split in memory
    for data_dir in (tmp_path, "hf:someone/captions"):
        with pytest.raises(UserError, match="no such split.*--select-on loss"):
            train_mod.check_selection(TrainConfig(select_on="cider"), SupraVL(tiny_config()), data_dir)
        train_mod.check_selection(TrainConfig(), SupraVL(tiny_config()), data_dir)  # loss needs nothing
    train_mod.check_selection(TrainConfig(select_on="cider"), SupraVL(tiny_config()), None)  # built-in shapes
    with pytest.raises(UserError, match="unknown selection 'bleu'"):
        train(tiny_config(), TrainConfig(select_on="bleu"), "unused", progress_bar=False)


def test_augment_scale_needs_augment_and_a_share_of_the_image() -> None:
    with pytest.raises(UserError, match="--augment-scale sets the crops of --augment"):
        train(tiny_config(), TrainConfig(augment_scale=0.5), "unused", progress_bar=False)
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match=f"--augment-scale .* in \\(0, 1\\]; got {bad}"):
            train(tiny_config(), TrainConfig(augment=True, augment_scale=bad), "unused", progress_bar=False)


def test_training_crops_as_augment_scale_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scales = []

    def recording_augment(images: torch.Tensor, flippable: torch.Tensor, rand: torch.Tensor,
                          min_scale: float = 0.7) -> torch.Tensor:
        scales.append(min_scale)
        return images

    monkeypatch.setattr(train_mod, "augment", recording_augment)
    tc = TrainConfig(max_steps=2, batch_size=8, warmup_steps=1, augment=True, augment_scale=0.4)
    train(tiny_config(), tc, tmp_path, progress_bar=False)
    assert scales == [0.4, 0.4]  # one call per training batch, none for the dev batches


def test_words_of_images_marks_the_tokens_of_each_images_captions_but_not_the_special_ones() -> None:
    tokens = torch.tensor([[1, 5, 6, 2, 0], [1, 6, 7, 2, 0], [1, 3, 8, 2, 0]])  # <bos> ... <eos> <pad>
    words = words_of_images(tokens, torch.tensor([0, 0, 1]), n_images=3, vocab_size=10, special_ids=[0, 1, 2, 3])
    assert words[0].nonzero().flatten().tolist() == [5, 6, 7]  # both captions of image 0
    assert words[1].nonzero().flatten().tolist() == [8]  # <unk> (3) is no word
    assert not words[2].any()  # an image without captions


def test_word_loss_adds_a_bag_of_words_loss_on_the_visual_tokens() -> None:
    torch.manual_seed(0)
    model = SupraVL(tiny_config())
    images, input_ids = torch.randn(2, 3, 32, 32), torch.randint(4, 300, (2, 6))
    targets = input_ids.roll(-1, 1)
    targets[1, 4:] = IGNORE_INDEX  # row 0 has 6 targets, row 1 has 4
    words = torch.zeros(2, 300, dtype=torch.bool)
    words[0, [5, 6]] = words[1, 7] = True
    _, captions_only = model(images, input_ids, targets, loss_only=True)
    _, both = model(images, input_ids, targets, words, loss_only=True, word_loss=0.5)
    log_p = (model.encode_images(images).mean(1) @ model.tok_emb.weight.T).log_softmax(-1)  # (2, V)
    per_row = torch.stack([-log_p[0, [5, 6]].mean(), -log_p[1, 7]])  # each image's words weighted alike
    by_hand = (6 * per_row[0] + 4 * per_row[1]) / 10  # the rows weighted by their targets
    assert torch.allclose(both - captions_only, 0.5 * by_hand, atol=1e-5)
    with pytest.raises(ValueError, match="word_loss needs the words"):
        model(images, input_ids, targets, loss_only=True, word_loss=0.5)
    # Split into micro-batches or processes, each part's loss weighted by its share of the targets
    # (train.global_batch_step) adds up to the whole batch's loss. (eval: batch norm's running statistics)
    model.eval()
    _, whole = model(images, input_ids, targets, words, loss_only=True, word_loss=0.5)
    parts = [model(images[r], input_ids[r], targets[r], words[r], loss_only=True, word_loss=0.5)[1]
             for r in (slice(0, 1), slice(1, 2))]
    assert torch.allclose(whole, (6 * parts[0] + 4 * parts[1]) / 10, atol=1e-5)
    model.train()
    model.words_loss(model.encode_images(images), words).sum().backward()
    assert model.vis_enc.conv1[0].weight.grad.abs().sum() > 0  # straight to the encoder's first layer


def test_training_with_word_loss_teaches_the_visual_tokens_the_captions_words(tmp_path: Path,
                                                                            shapes_dir: Path) -> None:
    from picovlm.checkpoint import from_pretrained
    from picovlm.data.batches import CaptionBatches
    from picovlm.data.flickr8k import load_split

    losses = {}
    for weight in (0.0, 1.0):
        tc = TrainConfig(epochs=8, batch_size=32, lr=3e-3, warmup_steps=5, word_loss=weight)
        train(tiny_config(), tc, tmp_path / str(weight), data_dir=shapes_dir, progress_bar=False)
        model = from_pretrained(tmp_path / str(weight) / "best").eval()
        batches = CaptionBatches(load_split(shapes_dir, "train"), model.tokenizer, model.cfg, progress=False)
        assert batches.batch(torch.arange(4)).words is None  # built only when asked for
        batches.serve_words()
        batch = batches.batch(torch.arange(64))
        images, _, _ = train_mod.to_device(batch, model.cfg, "cpu")
        with torch.no_grad():
            losses[weight] = model.words_loss(model.encode_images(images), batch.words).mean().item()
    assert losses[1.0] < losses[0.0] - 1.0, losses


def test_word_loss_is_refused_where_no_captions_are_in_memory(tmp_path: Path) -> None:
    (tmp_path / "shard-000000.tar").write_bytes(b"")  # a folder of shards is streamed
    with pytest.raises(UserError, match="--word-loss needs a captioner trained on a caption folder"):
        train(tiny_config(), TrainConfig(word_loss=1.0), tmp_path / "run", data_dir=tmp_path, progress_bar=False)
    with pytest.raises(UserError, match="--word-loss needs a captioner"):  # before loading any weights
        train(tiny_nanovlm(), TrainConfig(word_loss=1.0), tmp_path / "run", progress_bar=False)
    with pytest.raises(UserError, match="--word-loss is a weight, 0 or more"):
        train(tiny_config(), TrainConfig(word_loss=-1.0), tmp_path / "run", progress_bar=False)
