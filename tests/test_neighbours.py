"""--mbr-neighbours: the index of training captions a checkpoint carries, and the beam it picks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import picovlm
from picovlm.checkpoint import save_pretrained
from picovlm.cli import main
from picovlm.config import TrainConfig
from picovlm.data.flickr8k import load_split
from picovlm.errors import UserError
from picovlm.generate import GenerationConfig, _beam_search, _PrefixSession, decode, generate, preprocess, sentence_bleu
from picovlm.neighbours import INDEX_FILE, CaptionIndex, add_index, image_features
from picovlm.train import train
from tests.conftest import tiny_config
from tests.test_generate import MarkovSession, _three_caption_model


@pytest.fixture(scope="module")
def indexed(trained_run: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained model's best/ with its index over the shapes train split."""
    folder = tmp_path_factory.mktemp("indexed") / "best"
    shutil.copytree(trained_run / "best", folder)
    assert add_index(folder, shapes_dir) == folder / INDEX_FILE
    return folder


def test_the_neighbours_captions_choose_among_the_beams() -> None:
    log_probs, bos, eos = _three_caption_model()  # beams [2], [3, 5, 6], [4, 5, 6], most probable first
    start = torch.tensor([[bos], [bos]])
    gen = GenerationConfig(strategy="mbr", beam_width=3, mbr_neighbours=2)
    # image 0's two neighbours were described as [4, 5, 6] (and [3]); image 1's as [2]
    evidence = [[[[4, 5, 6], [3]], [[9, 4, 5, 6]]], [[[2]], [[2], [7]]]]
    assert decode(MarkovSession(log_probs, start), start, gen, eos, 10, evidence) == [[4, 5, 6], [2]]


def test_the_index_holds_each_training_image_and_its_captions(indexed: Path, shapes_dir: Path) -> None:
    model = picovlm.load(str(indexed))
    train = load_split(shapes_dir, "train")
    index = model.neighbours
    assert index is not None and index.features.shape == (len(train.names), model.cfg.lm_hidden_dim)
    assert torch.allclose(index.features.float().norm(dim=-1), torch.ones(len(train.names)), atol=1e-2)
    # each image's own features find itself first, and its captions come back as token ids
    pixels = preprocess([train.image_dir / n for n in train.names[:5]], model)
    with torch.inference_mode():
        nearest = index.nearest_captions(image_features(model.encode_images(pixels)), k=3)
    for i, ref_sets in enumerate(nearest):
        assert len(ref_sets) == 3
        assert ref_sets[0] == [model.tokenizer.encode(c)[1:-1] for c in train.captions[i]]


def test_decoding_keeps_the_beam_that_best_fits_the_nearest_images_captions(indexed: Path, shapes_dir: Path) -> None:
    model = picovlm.load(str(indexed))
    train = load_split(shapes_dir, "train")
    pixels = preprocess([train.image_dir / n for n in train.names[:6]], model)
    gen = GenerationConfig(strategy="mbr", beam_width=4, mbr_neighbours=1)
    picked = generate(model, pixels, gen)
    with torch.inference_mode():
        visual = model.encode_images(pixels)
        start = torch.full((len(pixels), 1), model.cfg.bos_token_id)
        beams, _ = _beam_search(_PrefixSession(model, visual, start, True), start, gen, model.cfg.eos_token_id,
                                model.cfg.lm_max_text_len)
    eos = model.cfg.eos_token_id
    for i, choice in enumerate(picked):  # a training image's nearest image is itself: its own captions judge
        rows = [row[:row.index(eos)] if eos in row else row for row in beams[i, :, 1:].tolist()]
        own = [model.tokenizer.encode(c)[1:-1] for c in train.captions[i]]
        assert choice in rows
        assert sentence_bleu(choice, own) == max(sentence_bleu(row, own) for row in rows)


def test_cli_index_then_caption_with_the_neighbours(trained_run: Path, shapes_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "m"
    shutil.copytree(trained_run / "best", folder)
    image = str(load_split(shapes_dir, "dev").image_dir / load_split(shapes_dir, "dev").names[0])
    args = ["caption", image, "--model", str(folder), "--strategy", "mbr", "--mbr-neighbours", "3", "--json"]
    assert main(args) == 2  # no index yet: a clear error, not a traceback
    assert "picovlm index" in capsys.readouterr().err
    assert main(["index", "--model", str(folder), "--data", str(shapes_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {folder / INDEX_FILE}"
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["caption"]


def test_saving_keeps_the_index_while_it_fits_the_weights(indexed: Path, tmp_path: Path) -> None:
    model = picovlm.load(str(indexed))
    save_pretrained(model, tmp_path / "copy")
    assert picovlm.load(str(tmp_path / "copy")).neighbours is not None
    with torch.no_grad():
        model.tok_emb.weight.add_(0.01)  # other weights: the features no longer match
    save_pretrained(model, tmp_path / "changed")
    assert not (tmp_path / "changed" / INDEX_FILE).exists()


def test_an_index_beside_other_weights_is_refused_until_rebuilt(trained_run: Path, shapes_dir: Path, indexed: Path,
                                                                tmp_path: Path) -> None:
    folder = tmp_path / "last"
    shutil.copytree(trained_run / "last", folder)
    shutil.copy(indexed / INDEX_FILE, folder / INDEX_FILE)  # built with best/'s weights
    with pytest.raises(UserError, match="built with other weights .*picovlm index"):
        picovlm.load(str(folder))
    add_index(folder, shapes_dir)  # what the message says to do: the stale index is replaced
    assert picovlm.load(str(folder)).neighbours is not None


@pytest.mark.parametrize("content", [b"not a safetensors file", b""])
def test_a_malformed_index_is_a_clear_error_until_rebuilt(indexed: Path, shapes_dir: Path, tmp_path: Path,
                                                          content: bytes) -> None:
    folder = tmp_path / "m"
    shutil.copytree(indexed, folder)
    (folder / INDEX_FILE).write_bytes(content)
    with pytest.raises(UserError, match="not a readable caption index"):
        picovlm.load(str(folder))
    add_index(folder, shapes_dir)
    assert picovlm.load(str(folder)).neighbours is not None


def test_an_index_without_its_parts_is_refused(indexed: Path, tmp_path: Path) -> None:
    index = CaptionIndex.load(indexed / INDEX_FILE)
    parts = {"features": index.features, "tokens": index.tokens, "lengths": index.lengths, "image_of": index.image_of}
    fingerprint = {"fingerprint": index.fingerprint}
    broken = [  # captions of images the index does not hold; lengths that do not add up; no captions; no fingerprint
        ({**parts, "image_of": index.image_of + 10**6}, fingerprint),
        ({**parts, "lengths": index.lengths + 1}, fingerprint),
        ({k: v for k, v in parts.items() if k != "tokens"}, fingerprint),
        (parts, None),
    ]
    for tensors, metadata in broken:
        save_file(tensors, str(tmp_path / INDEX_FILE), metadata=metadata)
        with pytest.raises(UserError, match="does not hold a caption index"):
            CaptionIndex.load(tmp_path / INDEX_FILE)


def test_bad_neighbour_settings_are_user_errors(indexed: Path) -> None:
    model = picovlm.load(str(indexed))
    pixels = torch.zeros(1, 3, model.cfg.img_size, model.cfg.img_size)
    with pytest.raises(UserError, match="--strategy mbr and K >= 1"):
        generate(model, pixels, GenerationConfig(strategy="beam", mbr_neighbours=3))
    with pytest.raises(UserError, match="--strategy mbr and K >= 1"):
        generate(model, pixels, GenerationConfig(strategy="mbr", mbr_neighbours=0))
    with pytest.raises(UserError, match="not both"):
        generate(model, pixels, GenerationConfig(strategy="mbr", mbr_neighbours=3, mbr_temperature=4.0))


def test_a_training_run_whose_decoding_reads_neighbours_indexes_its_checkpoints(shapes_dir: Path,
                                                                               tmp_path: Path) -> None:
    decoding = {"strategy": "mbr", "beam_width": 3, "mbr_neighbours": 2}
    tc = TrainConfig(epochs=2, batch_size=32, lr=3e-3, warmup_steps=2, generation=decoding)
    summary = train(tiny_config(), tc, tmp_path / "run", data_dir=shapes_dir, progress_bar=False)
    for folder in (summary["best"], summary["last"]):
        model = picovlm.load(folder)  # the index fits each checkpoint's own weights
        assert model.neighbours is not None and model.generation == decoding
    dev = load_split(shapes_dir, "dev")
    assert model.caption([dev.image_dir / dev.names[0]])[0]  # the stored decoding runs as it is
