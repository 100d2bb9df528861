"""VQA data for the placeholder-token family: built-in sets, the Cauldron format, chat encoding, fusion."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from picovlm.chat import IM_END, IMAGE_TOKEN, add_image_token, collate, encode_conversation
from picovlm.data.cauldron import build_cauldron, load_cauldron, mix, split_train_val, write_shapes_vqa
from picovlm.data.shapes import draw_scene
from picovlm.data.vqa import multiple_choice_rows, questions, vqa_rows
from picovlm.errors import UserError
from picovlm.models.fusion import replace_image_tokens
from picovlm.models.supravl import IGNORE_INDEX


def test_questions_are_answered_by_the_scene() -> None:
    rng = random.Random(0)
    for _ in range(50):
        _, scene = draw_scene(rng, 64)
        qa = {cat: (q, a) for cat, q, a, _ in questions(scene, rng)}
        assert qa["colour"][1] == scene.colour and qa["shape"][1] == scene.other_shape
        assert qa["count"][1] == ["one", "two", "three"][scene.count - 1]
        q, a = qa["position"]
        assert (a == "yes") == (f" {scene.relation} the {scene.other_colour}" in q)
        q, a = qa["existence"]
        named = q.removeprefix("Is there a ").removesuffix("?")
        present = {f"{scene.colour} {scene.shape}", f"{scene.other_colour} {scene.other_shape}"}
        assert (a == "yes") == (named in present)


def test_multiple_choice_rows_are_mmstar_rows() -> None:
    rows = list(multiple_choice_rows(30, size=32))
    assert set(rows[0]) == {"index", "question", "image", "answer", "category", "l2_category"}
    for row in rows:
        options = dict(o.split(": ") for o in row["question"].split("Options: ")[1].split(", "))
        assert row["answer"] in options and len(options) >= 2
    assert len({r["category"] for r in rows}) >= 4


def test_built_in_vqa_set_round_trips(tmp_path: Path) -> None:
    write_shapes_vqa(tmp_path / "vqa", n_train=12, n_val=4, n_multiple_choice=6, size=32)
    train, val = load_cauldron(tmp_path / "vqa"), load_cauldron(tmp_path / "vqa", "validation")
    assert (len(train), len(val)) == (12, 4)
    expected = next(vqa_rows(1, size=32, seed=0))
    assert train[0]["texts"] == expected["texts"] and train[0]["images"][0].size == (32, 32)
    mc = datasets.load_dataset(str(tmp_path / "vqa" / "mmstar"), split="val")
    assert len(mc) == 6 and mc[0]["image"].size == (32, 32)


def test_mix_weights_and_split(tmp_path: Path) -> None:
    write_shapes_vqa(tmp_path / "vqa", n_train=40, n_val=10, n_multiple_choice=2, size=16)
    a, b = load_cauldron(tmp_path / "vqa"), load_cauldron(tmp_path / "vqa", "validation")
    mixed = mix([(a, 1.0), (b, 1.0)], seed=0)
    # all_exhausted: the small part is oversampled until the large one is used up.
    assert len(mixed) >= len(a) + len(b)
    tr, va = split_train_val(a, 0.25, seed=0)
    assert (len(tr), len(va)) == (30, 10)
    with pytest.raises(UserError, match="positive"):
        mix([(a, 0.0)])


def test_build_cauldron_from_images_and_jsonl(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 10), (200, 10, 10)).save(tmp_path / "img" / name)
    lines = [{"image": "a.png", "question": "Which colour?", "answer": "red"},
             {"images": ["a.png", "b.png"], "texts": [{"user": "Same?", "assistant": "yes"},
                                                      {"user": "Wide?", "assistant": "yes"}]}]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    done = subprocess.run([sys.executable, "-m", "picovlm.cli", "data", "build-cauldron", str(tmp_path / "img"),
                           str(tmp_path / "qa.jsonl"), str(tmp_path / "out"), "--source", "mine"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ds = load_cauldron(tmp_path / "out")
    assert [len(r["images"]) for r in ds] == [1, 2] and ds[1]["texts"][1] == {"user": "Wide?", "assistant": "yes",
                                                                           "source": "mine"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "missing.png", "question": "?", "answer": "!"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl line 1: image not found"):
        build_cauldron(tmp_path / "img", tmp_path / "bad.jsonl", tmp_path / "out2")
    (tmp_path / "bad2.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(UserError, match="line 1: expected"):
        build_cauldron(tmp_path / "img", tmp_path / "bad2.jsonl", tmp_path / "out3")
    with pytest.raises(UserError, match="cannot read Cauldron data"):
        load_cauldron(tmp_path / "vqa-missing")
    datasets.Dataset.from_dict({"question": ["?"]}).to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(UserError, match="not in the Cauldron format: no column images, texts"):
        load_cauldron(tmp_path / "other.parquet")


def _chat_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["What colour is the square? red blue green user assistant"] * 10, trainer)
    add_image_token(tok)
    return tok


def test_only_assistant_tokens_carry_loss() -> None:
    tok = _chat_tokenizer()
    image_id = tok.token_to_id(IMAGE_TOKEN)
    turns = [{"user": "What colour is the square?", "assistant": "red"}, {"user": "And?", "assistant": "blue"}]
    ids, labels = encode_conversation(tok, turns, n_images=2, tokens_per_image=3, max_len=200)
    assert ids.count(image_id) == 6 and len(ids) == len(labels)
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == f"red{IM_END}blue{IM_END}"
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels))
    # Cutting inside the image tokens makes the example unusable; cutting later only drops turns.
    assert encode_conversation(tok, turns, 2, 3, max_len=5) is None
    cut_ids, cut_labels = encode_conversation(tok, turns, 2, 3, max_len=len(ids) - 3)
    assert len(cut_ids) == len(ids) - 3 and cut_labels == labels[:len(ids) - 3]


def test_collate_pads_without_mixing_samples() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "images": torch.zeros(1, 3, 4, 4)},
                {"input_ids": [5], "labels": [5], "images": torch.zeros(0, 3, 4, 4)}]
    batch = collate(examples, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]] and [len(x) for x in batch.images] == [1, 0]


def test_image_embeddings_fill_the_placeholders_in_order() -> None:
    IMG = 9
    # Row 0: two images of K=2 tokens; row 1: none; row 2: one image, not at the start.
    input_ids = torch.tensor([[IMG, IMG, IMG, IMG, 3], [3, 4, 5, 6, 7], [3, IMG, IMG, 4, 0]])
    text = torch.zeros(3, 5, 2)
    images = torch.arange(3 * 2 * 2, dtype=torch.float).view(3, 2, 2)  # (N=3 images, K=2, D=2)
    fused = replace_image_tokens(text, input_ids, images, IMG)
    assert torch.equal(fused[0, :4], images[:2].reshape(4, 2)) and torch.equal(fused[2, 1:3], images[2])
    assert torch.equal(fused[1], text[1]) and fused[0, 4].abs().sum() == 0
    with pytest.raises(UserError, match="image tokens"):
        replace_image_tokens(text, input_ids, images[:2], IMG)
