"""Bad input that the other test files do not cover, crash-safety under SIGKILL, property tests.

Together with test_data.py, test_cli.py, test_checkpoint.py and test_train.py this is the
bad-input matrix: every case ends in a one-line, actionable error or a counted skip.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from picovlm.config import TrainConfig, VLMConfig
from picovlm.data.batches import CaptionBatches
from picovlm.data.flickr8k import CaptionSet, load_split, parse_captions_csv, parse_token_file
from picovlm.data.images import load_image
from picovlm.errors import UserError
from picovlm.io import find_complete_dir
from picovlm.models.supravl import IGNORE_INDEX, SupraVL
from picovlm.tokenizer import CaptionTokenizer
from picovlm.train import train
from tests.conftest import tiny_config


def _caption_folder(root: Path, csv_bytes: bytes, n_images: int = 2) -> Path:
    (root / "Images").mkdir(parents=True)
    for i in range(n_images):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(root / "Images" / f"{i}.jpg")
    (root / "captions.txt").write_bytes(csv_bytes)
    return root


def test_empty_dataset(tmp_path: Path) -> None:
    _caption_folder(tmp_path, b"image,caption\n")
    with pytest.raises(UserError, match="lists no captions"):
        load_split(tmp_path, "train")


def test_non_utf8_captions_are_replaced_with_a_warning(tmp_path: Path) -> None:
    _caption_folder(tmp_path, b"image,caption\n0.jpg,a caf\xe9 sign\n1.jpg,a dog\n")
    with pytest.warns(UserWarning, match="not valid UTF-8"):
        data = load_split(tmp_path, "train")
    assert data.captions[0] == ["a caf\ufffd sign"]


def test_empty_captions_are_counted_and_skipped(tmp_path: Path) -> None:
    _caption_folder(tmp_path, b'image,caption\n0.jpg,""\n0.jpg,a dog\n1.jpg,  \n1.jpg,a cat\n')
    with pytest.warns(UserWarning, match="skipped 2 empty caption"):
        data = load_split(tmp_path, "train")
    assert data.captions == [["a dog"], ["a cat"]]


def test_one_pixel_image_is_usable(tmp_path: Path) -> None:
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "dot.png")
    assert load_image(tmp_path / "dot.png").size == (1, 1)


def test_out_of_memory_suggests_a_smaller_batch(tmp_path: Path, shapes_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def forward_out_of_memory(self, images, input_ids, targets=None, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 98765432100 bytes")

    monkeypatch.setattr(SupraVL, "forward", forward_out_of_memory)
    with pytest.raises(UserError, match="out of memory with batch size 64; try --batch-size 32"):
        train(tiny_config(), TrainConfig(epochs=1), tmp_path / "oom", data_dir=shapes_dir, progress_bar=False)


def test_other_runtime_errors_are_not_disguised(tmp_path: Path, shapes_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, images, input_ids, targets=None, **kwargs):
        raise RuntimeError("shape mismatch in a bug")

    monkeypatch.setattr(SupraVL, "forward", broken)
    with pytest.raises(RuntimeError, match="bug"):
        train(tiny_config(), TrainConfig(epochs=1), tmp_path / "bug", data_dir=shapes_dir, progress_bar=False)


# --- crash safety -------------------------------------------------------------------------


def _train_cmd(data: Path, out: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "picovlm.cli", "train", "--data", str(data), "--out", str(out), "--epochs", "3",
           "--batch-size", "16", "--save-every", "2", "--log-every", "1", "--lr", "2e-3", "--no-progress",
           "--seed", "9"]
    for key, value in tiny_config().to_dict().items():
        if key.startswith(("cnn_", "lm_")) or key == "img_size":
            cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd + (["--resume"] if resume else [])


def _last_logged_step(out: Path) -> int:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return max((r["step"] for r in rows), default=0)


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path: Path, shapes_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(shapes_dir, full, False), check=True, env=env, capture_output=True, timeout=300)

    cut = tmp_path / "cut"
    rng = random.Random(0)
    kills = 0
    for _ in range(4):
        last = find_complete_dir(cut / "last")
        proc = subprocess.Popen(_train_cmd(shapes_dir, cut, resume=(last / "training_state.json").is_file()),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not (cut / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.05)  # wait until training has started, then kill at a random moment
        time.sleep(rng.uniform(0.2, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        last = find_complete_dir(cut / "last")
        if (last / "training_state.json").is_file():
            state = json.loads((last / "training_state.json").read_text())["progress"]
            load_file(str(last / "model.safetensors"))  # every surviving checkpoint reads back
            assert state["step"] >= _last_logged_step(cut) - 2  # at most save_every steps lost
    assert kills >= 2
    subprocess.run(_train_cmd(shapes_dir, cut, resume=True), check=True, env=env, capture_output=True, timeout=300)
    a, b = load_file(str(full / "last" / "model.safetensors")), load_file(str(cut / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- properties ---------------------------------------------------------------------------

_caption_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1,
                        max_size=30).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s)
_image_name = st.from_regex(r"[a-z0-9_]{1,12}\.jpg", fullmatch=True)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(_image_name, _caption_text), min_size=1, max_size=8))
def test_csv_parser_round_trips_any_captions(rows: list[tuple[str, str]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows([("image", "caption"), *rows])
    parsed = parse_captions_csv(buf.getvalue())
    expected: dict[str, list[str]] = {}
    for name, caption in rows:
        expected.setdefault(name, []).append(caption.strip())
    assert parsed == expected


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(_image_name, _caption_text.filter(lambda s: "\t" not in s)), min_size=1, max_size=8))
def test_token_file_parser_round_trips(rows: list[tuple[str, str]]) -> None:
    text = "".join(f"{name}#{i}\t{caption}\n" for i, (name, caption) in enumerate(rows))
    expected: dict[str, list[str]] = {}
    for name, caption in rows:
        expected.setdefault(name, []).append(caption.strip())
    assert parse_token_file(text) == expected


_TOKENIZER = CaptionTokenizer.train(["a dog runs on the grass", "two kids play in the water"] * 10, 300)


@settings(max_examples=40, deadline=None)
@given(st.lists(_caption_text, min_size=1, max_size=6), st.integers(2, 12))
def test_collation_pads_and_masks_correctly(captions: list[str], max_text: int) -> None:
    cfg = VLMConfig(img_size=4, lm_max_text_len=max_text)
    data = CaptionSet(Path("/nonexistent"), ["x.jpg"], [captions])
    batches = CaptionBatches.__new__(CaptionBatches)  # skip image decoding: collation is under test
    import numpy as np

    import picovlm.data.batches as batches_mod

    original = batches_mod.cached_images
    batches_mod.cached_images = lambda root, names, size, *cache_dir_and_progress: (
        np.zeros((1, size, size, 3), np.uint8), np.ones(1, bool))
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batches.__init__(data, _TOKENIZER, cfg)
    finally:
        batches_mod.cached_images = original
    b = batches.batch(torch.arange(len(captions)))
    for row, caption in enumerate(captions):
        ids = _TOKENIZER.encode(caption)[:max_text + 1]
        n = len(ids) - 1  # number of real (input, target) positions
        assert b.input_ids[row, :n].tolist() == ids[:-1]
        assert b.targets[row, :n].tolist() == ids[1:]
        assert (b.targets[row, n:] == IGNORE_INDEX).all()  # padding never carries loss
        assert (b.input_ids[row, n + 1:] == 0).all()  # after the last token (whose target is ignored): <pad>
    assert b.input_ids.shape[1] <= max_text
