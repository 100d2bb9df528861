"""Data: both Flickr8k layouts, splits, the image cache, bad files, the shapes set and its scores."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from picovlm.config import VLMConfig
from picovlm.data import images as images_mod
from picovlm.data.batches import CaptionBatches, augment
from picovlm.data.flickr8k import load_split, parse_captions_csv, parse_token_file
from picovlm.data.images import cached_images, load_image
from picovlm.data.shapes import make_scene, parse_caption, score_captions
from picovlm.errors import UserError
from picovlm.tokenizer import CaptionTokenizer


def _write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (i * 20 % 255, 100, 50)).save(folder / name)


def test_kaggle_layout_with_official_lists(tmp_path: Path) -> None:
    names = [f"im{i}.jpg" for i in range(6)]
    _write_images(tmp_path / "Images", names)
    rows = "".join(f'{n},"a dog, running {i}"\n{n},a cat\n' for i, n in enumerate(names))
    (tmp_path / "captions.txt").write_text("image,caption\n" + rows + "\n\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("im0.jpg\nim1.jpg\nim2.jpg\nim3.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("im4.jpg\nim5.jpg\n")
    train = load_split(tmp_path, "train")
    assert train.names == ["im0.jpg", "im1.jpg", "im2.jpg", "im3.jpg"]
    assert train.captions[0] == ["a dog, running 0", "a cat"]
    assert load_split(tmp_path, "dev").names == ["im4.jpg", "im5.jpg"]
    with pytest.raises(UserError, match="test"):
        load_split(tmp_path, "test")


def test_original_layout_with_seeded_split(tmp_path: Path) -> None:
    names = [f"p{i}.jpg" for i in range(40)]
    _write_images(tmp_path / "Flicker8k_Dataset", names)
    (tmp_path / "Flickr8k_text").mkdir()
    lines = "".join(f"{n}#{k}\tcaption {k} of {n}\n" for n in names for k in range(5))
    (tmp_path / "Flickr8k_text" / "Flickr8k.token.txt").write_text(lines)
    splits = {s: load_split(tmp_path, s, seed=0).names for s in ("train", "dev", "test")}
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [30, 5, 5]
    assert set().union(*splits.values()) == set(names)
    assert splits == {s: load_split(tmp_path, s, seed=0).names for s in splits}  # deterministic
    assert splits["dev"] != load_split(tmp_path, "dev", seed=1).names
    assert len(load_split(tmp_path, "train").captions[0]) == 5


def test_parsers() -> None:
    assert parse_captions_csv('image,caption\na.jpg,one, two\n\nb.jpg,"x, y"\n') == {"a.jpg": ["one, two"],
                                                                                     "b.jpg": ["x, y"]}
    with pytest.raises(UserError, match="header"):
        parse_captions_csv("img,text\na.jpg,hi\n")
    assert parse_token_file("a.jpg#0\thello\n\na.jpg#1\tworld\n") == {"a.jpg": ["hello", "world"]}
    with pytest.raises(UserError, match="TAB"):
        parse_token_file("a.jpg hello\n")
    with pytest.raises(UserError, match=r"captions.txt:3: expected 'image,caption'"):
        parse_captions_csv("image,caption\na.jpg,ok\nb.jpg\n")  # a row missing its caption column


def test_missing_or_unknown_folder_names_the_layouts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="captions.txt"):
        load_split(tmp_path / "nope", "train")
    (tmp_path / "random").mkdir()
    with pytest.raises(UserError, match="Flickr8k.token.txt"):
        load_split(tmp_path / "random", "train")


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "alpha.png")
    Image.new("P", (8, 8)).save(tmp_path / "palette.png")
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.jpg")
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    for name in ("alpha.png", "palette.png", "grey.jpg", "cmyk.jpg", "deep.png"):
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == (8, 8)
    assert load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image(tmp_path / "deep.png").getpixel((0, 0))[0] == 255  # 16-bit scaled, not clipped


def test_exif_rotation_is_honoured(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def _truncated_jpeg(path: Path) -> None:
    Image.new("RGB", (64, 64)).save(path.with_suffix(".full.jpg"))
    path.write_bytes(path.with_suffix(".full.jpg").read_bytes()[:200])


@pytest.mark.parametrize("name, make", [
    ("empty.jpg", lambda p: p.write_bytes(b"")),
    ("text.jpg", lambda p: p.write_text("not an image")),
    ("cut.jpg", _truncated_jpeg),
    ("missing.jpg", lambda p: None),
])
def test_bad_image_is_a_user_error_naming_the_file(tmp_path: Path, name: str, make) -> None:
    make(tmp_path / name)
    with pytest.raises(UserError, match=name):
        load_image(tmp_path / name)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(UserError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_cache_skips_bad_files_reuses_and_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["a.jpg", "b.jpg", "c.jpg"]
    _write_images(tmp_path / "img", names)
    (tmp_path / "img" / "b.jpg").write_text("corrupt")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        arr, ok = cached_images(tmp_path / "img", names, 16, tmp_path / "cache")
    assert arr.shape == (3, 16, 16, 3) and arr.dtype == np.uint8 and ok.tolist() == [True, False, True]
    calls = []
    real = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda p: calls.append(p) or real(p))
    arr2, _ = cached_images(tmp_path / "img", names, 16, tmp_path / "cache")
    assert calls == [] and np.array_equal(arr, arr2)  # second epoch/run: no decoding at all
    time.sleep(0.01)
    Image.new("RGB", (40, 30), (255, 255, 255)).save(tmp_path / "img" / "a.jpg")  # the source changes
    arr3, _ = cached_images(tmp_path / "img", names, 16, tmp_path / "cache")
    assert len(calls) == 3 and arr3[0].mean() > 250


def test_cache_wanted_twice_at_once_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two training runs started together on one dataset: the second waits for the first's cache
    # instead of decoding every image again (threads here; the lock file works across processes).
    names = [f"{i}.jpg" for i in range(4)]
    _write_images(tmp_path / "img", names)
    decoded, start = [], threading.Barrier(2)
    real = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda p: decoded.append(p) or time.sleep(0.05) or real(p))
    results: list[np.ndarray] = []

    def run() -> None:
        start.wait()
        results.append(cached_images(tmp_path / "img", names, 16, tmp_path / "cache", progress=False)[0])

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(decoded) == len(names) and len(results) == 2 and np.array_equal(results[0], results[1])


def test_batches_pad_truncate_and_shuffle(shapes_dir: Path) -> None:
    data = load_split(shapes_dir, "train")
    tok = CaptionTokenizer.train([c for caps in data.captions for c in caps], 300)
    cfg = VLMConfig(img_size=24, lm_max_text_len=6)
    with pytest.warns(UserWarning, match="truncated"):
        batches = CaptionBatches(data, tok, cfg)
    assert len(batches) == 2 * len(data)
    b = next(batches.epoch(8, seed=0))
    assert b.images.shape == (8, 24, 24, 3) and b.input_ids.shape[1] <= 6
    assert torch.equal(b.input_ids[:, 1:], b.targets[:, :-1].clamp(min=0))  # targets are inputs shifted
    order_a = [x.input_ids for x in batches.epoch(8, seed=1)]
    assert any(not torch.equal(x, y) for x, y in zip(order_a, [x.input_ids for x in batches.epoch(8, seed=2)]))
    assert all(torch.equal(x, y) for x, y in zip(order_a, [x.input_ids for x in batches.epoch(8, seed=1)]))
    resumed = [x.input_ids for x in batches.epoch(8, seed=1, start_batch=3)]
    assert all(torch.equal(x, y) for x, y in zip(order_a[3:], resumed))


def test_augment_flips_only_captions_without_left_right() -> None:
    asym = torch.zeros(2, 3, 16, 16)
    asym[:, :, :, :8] = 1.0  # bright left half
    g = torch.Generator().manual_seed(0)
    flips = {True: 0, False: 0}
    for _ in range(40):
        out = augment(asym, torch.tensor([True, False]), torch.rand(2, 6, generator=g))
        for i, allowed in enumerate((True, False)):
            flips[allowed] += bool(out[i, :, :, 12:].mean() > out[i, :, :, :4].mean())
    assert flips[False] == 0 and flips[True] > 5


def test_augment_scale_bounds_the_random_crop() -> None:
    framed = torch.zeros(1, 3, 32, 32)
    framed[..., 0, :] = framed[..., -1, :] = framed[..., :, 0] = framed[..., :, -1] = 1.0  # a bright frame
    # the smallest crop, centred; brightness and contrast x1; no flip
    draws = torch.tensor([[0.0, 0.5, 0.5, 0.9, 0.5, 0.5]])
    whole = augment(framed, torch.tensor([True]), draws, min_scale=1.0)
    assert torch.allclose(whole, framed, atol=1e-6)  # a crop covering all of the image is the image
    quarter = augment(framed, torch.tensor([True]), draws, min_scale=0.25)
    assert quarter.max() < 0.05  # the centre half of each side: the frame is cut away
    at_corner = torch.tensor([[0.0, 0.0, 0.0, 0.9, 0.5, 0.5]])  # the smallest crop, at the top left
    assert augment(framed, torch.tensor([True]), at_corner).max() > 0.5  # the default 0.7 keeps part of it


def test_shapes_scene_and_scoring() -> None:
    import random

    image, captions = make_scene(random.Random(0), size=64)
    assert image.size == (64, 64) and len(captions) == 2
    assert all(parse_caption(c) is not None for c in captions)
    refs = [["two red circles left of a blue square", "a blue square right of two red circles"]]
    assert score_captions(["a blue square right of two red circles"], refs)["exact_match"] == 1.0
    wrong_colour = score_captions(["two green circles left of a blue square"], refs)
    assert wrong_colour["exact_match"] == 0 and wrong_colour["colour_acc"] == 0 and wrong_colour["count_acc"] == 1
    assert wrong_colour["attribute_acc"] == 0.75
    assert score_captions(["gibberish"], refs)["parsed"] == 0


def test_copy_of_dataset_is_readable(tmp_path: Path, shapes_dir: Path) -> None:
    shutil.copytree(shapes_dir, tmp_path / "copy")
    assert load_split(tmp_path / "copy", "dev").names == load_split(shapes_dir, "dev").names
