"""Self-critical sequence training: CIDEr-D as coco-caption computes it, a step that follows the
reward, and a run that writes, selects and resumes like `picovlm train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import picovlm.scst as scst_mod
from picovlm.checkpoint import from_pretrained
from picovlm.cli import main
from picovlm.config import TrainConfig
from picovlm.errors import UserError
from picovlm.models import build_model
from picovlm.scst import CiderD, scst_step, self_critical, sequence_log_probs
from picovlm.train import train
from tests.conftest import ctrl_c_during_step, tiny_config

REFS = [["a dog runs on the grass", "a brown dog is running", "the dog plays outside"],
        ["two children swim in a pool", "kids are swimming", "a child jumps into the water"],
        ["a man rides a bike down a hill", "a cyclist on a mountain road", "a man on a bicycle"]]
CANDIDATES = ["a dog is running on the grass", "a child is swimming in the pool", "a dog on a bike"]


def test_cider_d_equals_pycocoevalcap() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.cider.cider import Cider

    gts = {i: refs for i, refs in enumerate(REFS)}
    res = {i: [c] for i, c in enumerate(CANDIDATES)}
    mean, per_image = Cider().compute_score(gts, res)
    cider = CiderD(REFS)
    ours = [cider.score(c, cider.prepare(refs)) for c, refs in zip(CANDIDATES, REFS)]
    assert ours == pytest.approx(list(per_image), abs=1e-9)
    assert sum(ours) / len(ours) == pytest.approx(mean, abs=1e-9)
    assert ours[0] > ours[2] > 0  # the right caption scores above a half-wrong one


def test_reward_words_are_the_ptb_tokens_of_the_evaluation() -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = ["A man's T-shirt is red.", "Two dogs don't play; they're running!", "a black-and-white dog",
                "A child (in a pink dress) climbs 3 stairs .", "A dog's toy -- a ball...", "The girl 's hat",
                "rock-climbing man, at 4.5 km"]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    for i, caption in enumerate(captions):
        assert scst_mod.words(caption) == ptb[i][0].split(), caption


def test_sequence_log_probs_are_the_full_forward_log_probs(trained_run: Path) -> None:
    model = from_pretrained(trained_run / "best").eval()
    cfg = model.cfg
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    samples = [[5, 9, 7], [11]]
    visual = model.encode_images(images)
    logp, row_of = sequence_log_probs(model, visual, samples)
    assert row_of.tolist() == [0, 0, 0, 0, 1, 1]  # each caption's tokens, then its <eos>
    for r, ids in enumerate(samples):
        full = [cfg.bos_token_id, *ids, cfg.eos_token_id]
        logits, _ = model(images[r:r + 1], torch.tensor([full[:-1]]))
        expected = logits[0].float().log_softmax(-1).gather(1, torch.tensor(full[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(logp[row_of == r], expected, atol=1e-5, rtol=1e-5)


class _ShortIsBetter:
    """A stand-in for CIDEr-D whose reward is minus the caption's length in characters."""

    def score(self, caption: str, _refs: object) -> float:
        return -float(len(caption))


def test_scst_steps_follow_the_reward(trained_run: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config())  # untrained: samples run on until <eos> happens to be drawn
    model.tokenizer = from_pretrained(trained_run / "best").tokenizer
    tc = TrainConfig(scst_samples=4, grad_clip=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.randn(8, 3, 32, 32)
    words = [scst_step(model, optimizer, images, [None] * 8, _ShortIsBetter(), tc, "fp32", "cpu")["mean_words"]
             for _ in range(25)]
    assert sum(words[-5:]) / 5 < 0.5 * sum(words[:5]) / 5, words


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_scst_run_selects_on_dev_cider_and_resumes_exactly(tmp_path: Path, trained_run: Path,
                                                         shapes_dir: Path) -> None:
    tc = TrainConfig(scst_epochs=2, scst_lr=1e-3, scst_images=32, scst_samples=3, log_every=1, seed=4)
    summary = self_critical(trained_run / "best", shapes_dir, tmp_path / "full", tc, progress_bar=False)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    dev = [r["dev_cider"] for r in rows if "dev_cider" in r]
    assert len(dev) == 3 and dev[0] > 0  # before, and after each epoch
    assert summary["best_dev_cider"] == max(dev)
    assert (tmp_path / "full" / "best" / "model.safetensors").is_file()
    assert all("reward" in r for r in rows if "loss" in r) and summary["scst_steps"] == 8

    with ctrl_c_during_step(scst_mod, 5), pytest.raises(UserError, match="interrupted after SCST step 6.*--resume"):
        self_critical(trained_run / "best", shapes_dir, tmp_path / "cut", tc, progress_bar=False)
    with pytest.raises(UserError, match="already holds an SCST run"):
        self_critical(trained_run / "best", shapes_dir, tmp_path / "cut", tc, progress_bar=False)
    self_critical(trained_run / "best", shapes_dir, tmp_path / "cut", tc, resume=True, progress_bar=False)
    full, resumed = _weights(tmp_path / "full" / "last"), _weights(tmp_path / "cut" / "last")
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_train_with_scst_epochs_ends_in_the_scst_model(tmp_path: Path, shapes_dir: Path) -> None:
    tc = TrainConfig(epochs=2, batch_size=32, lr=3e-3, scst_epochs=1, scst_images=64, scst_samples=2)
    summary = train(tiny_config(), tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    assert summary["best"] == str(tmp_path / "run" / "scst" / "best")
    assert summary["scst"]["scst_steps"] == 2
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()  # the cross-entropy model stays
    assert from_pretrained(summary["best"]).cfg == from_pretrained(tmp_path / "run" / "best").cfg


def test_scst_cli_runs_and_refuses_bad_settings(tmp_path: Path, trained_run: Path, shapes_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    args = ["scst", "--model", str(trained_run / "best"), "--data", str(shapes_dir), "--no-progress",
            "--scst-images", "64", "--scst-samples", "2"]
    assert main([*args, "--out", str(tmp_path / "a"), "--scst-epochs", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["scst_steps"] == 2
    assert main([*args, "--out", str(tmp_path / "b"), "--scst-samples", "1"]) == 2
    assert "--scst-samples 2 or more" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("picovlm: error:") and err.count("\n") == 1
