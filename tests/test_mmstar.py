"""MMStar-style multiple-choice evaluation: prompts, left-padded batches, both ways of answering, the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

import picovlm
from picovlm.chat import IM_END, IM_START, add_image_token
from picovlm.cli import main
from picovlm.data.cauldron import write_shapes_vqa
from picovlm.data.vqa import multiple_choice_rows
from picovlm.errors import UserError
from picovlm.mmstar import (
    INSTRUCTION,
    encode_batch,
    evaluate_multiple_choice,
    format_report,
    load_multiple_choice,
    parse_answer,
    parse_options,
)
from picovlm.models.nanovlm import NanoVLM
from tests.test_nanovlm import tiny_nanovlm

VOCAB = 300


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return list(multiple_choice_rows(12, size=32))


@pytest.fixture(scope="module")
def tokenizer(rows: list[dict[str, Any]]) -> Tokenizer:
    """A byte-level BPE of exactly VOCAB tokens; the image token then gets id VOCAB = lm_vocab_size."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([r["question"] for r in rows] * 5 + [INSTRUCTION, "user assistant"] * 5, trainer)
    assert tok.get_vocab_size() == VOCAB
    assert add_image_token(tok) == VOCAB
    return tok


def tiny_model(tokenizer: Tokenizer, seed: int = 0) -> NanoVLM:
    torch.manual_seed(seed)
    model = NanoVLM(tiny_nanovlm(lm_vocab_size=VOCAB)).eval()
    model.tokenizer = tokenizer
    return model


class FavourTokens(nn.Module):
    """The model's own head, plus fixed bonuses on some tokens: the letters it will choose are known."""

    def __init__(self, head: nn.Module, bonus: dict[int, float]):
        super().__init__()
        self.head, self.bonus = head, bonus

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h).clone()
        for token, value in self.bonus.items():
            logits[..., token] += value
        return logits


def favouring(tokenizer: Tokenizer, bonus: dict[str, float]) -> NanoVLM:
    model = tiny_model(tokenizer)
    ids = {tokenizer.token_to_id(letter): value for letter, value in bonus.items()}
    model.decoder.lm_head = FavourTokens(model.decoder.lm_head, ids)
    return model


def test_options_and_generated_answers_are_parsed() -> None:
    question = "Which is right?\nOptions: A: 1, 2 or 3, B: a cat, C: red"
    options = parse_options(question)
    assert options == {"A": "1, 2 or 3", "B": "a cat", "C": "red"}
    assert parse_options("No options here") == {}
    assert [parse_answer(t, options) for t in ("B", "(C) red", "Answer: A", "BBBB", "it is red", "D", "")] == \
        ["B", "C", "A", "B", "C", None, None]


def test_prompts_are_left_padded_chat_turns(rows: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer)
    ids, mask, images = encode_batch(rows[:5], model, tokenizer)
    K = model.tokens_per_image
    assert images.shape == (5, 3, 32, 32) and mask[:, -1].all()
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # padding is exercised
    for i, row in enumerate(rows[:5]):
        real = ids[i, -lengths[i]:].tolist()
        assert (ids[i, :-lengths[i]] == model.cfg.pad_token_id).all() and real.count(model.image_token_id) == K
        text = tokenizer.decode(real, skip_special_tokens=False)
        assert text.startswith(f"{IM_START}user\n<|image|>") and text.endswith(f"{IM_END}\n{IM_START}assistant\n")
        assert f"{row['question']}\n{INSTRUCTION}" in text


def test_favoured_letter_decides_both_ways(rows: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    report = evaluate_multiple_choice(favouring(tokenizer, {"A": 100.0}), rows, batch_size=5, progress=False)
    n_a = sum(r["answer"] == "A" for r in rows)
    assert report["n_questions"] == 12
    for way in ("likelihood", "generate"):
        assert report[way]["accuracy"] == n_a / 12 and report[way]["correct"] == n_a
        for key in ("per_category", "per_l2_category"):
            groups = report[way][key].values()
            assert sum(g["n"] for g in groups) == 12 and sum(g["correct"] for g in groups) == n_a
    assert all(q["likelihood"] == q["generate"] == "A" for q in report["questions"])
    json.dumps(report)  # JSON-serialisable as it is
    assert "| **overall** | 12 |" in format_report(report)


def test_likelihood_chooses_only_offered_letters(rows: list[dict[str, Any]], tokenizer: Tokenizer) -> None:
    # D is favoured most, but only some questions offer a D; the others must fall back to B.
    has_d = ["D" in parse_options(r["question"]) for r in rows]
    assert any(has_d) and not all(has_d)
    report = evaluate_multiple_choice(favouring(tokenizer, {"D": 100.0, "B": 50.0}), rows, batch_size=5,
                                      progress=False)
    expected = ["D" if d else "B" for d in has_d]
    assert [q["likelihood"] for q in report["questions"]] == expected
    for q, row in zip(report["questions"], rows):
        assert set(q["letter_logits"]) == set(parse_options(row["question"]))
    # Generation writes D's; where D is not offered that names no option and counts as wrong.
    assert [q["generate"] for q in report["questions"]] == [e if e == "D" else None for e in expected]
    assert report["likelihood"]["correct"] == sum(e == r["answer"] for e, r in zip(expected, rows))
    assert report["generate"]["correct"] == sum(e == r["answer"] == "D" for e, r in zip(expected, rows))


def test_batches_with_left_padding_give_each_question_its_own_answer(rows: list[dict[str, Any]],
                                                                    tokenizer: Tokenizer) -> None:
    model = tiny_model(tokenizer, seed=3)
    alone = evaluate_multiple_choice(model, rows, batch_size=1, progress=False)
    batched = evaluate_multiple_choice(model, reversed(rows), batch_size=5, progress=False)
    by_index = {q["index"]: q for q in batched["questions"]}
    assert [q["index"] for q in batched["questions"]] == [r["index"] for r in reversed(rows)]
    for q in alone["questions"]:
        other = by_index[q["index"]]
        assert q["letter_logits"].keys() == other["letter_logits"].keys()
        for letter, value in q["letter_logits"].items():
            assert other["letter_logits"][letter] == pytest.approx(value, abs=1e-4)
        assert (q["likelihood"], q["generated"]) == (other["likelihood"], other["generated"])
    # Questions differ, so their logits do: a batch answering one question for all would fail above.
    assert len({tuple(q["letter_logits"].values()) for q in alone["questions"]}) > 1


def test_mistakes_are_user_errors(rows: list[dict[str, Any]], tokenizer: Tokenizer, tmp_path: Path) -> None:
    model = tiny_model(tokenizer)
    small = NanoVLM(tiny_nanovlm(lm_vocab_size=VOCAB - 1))  # a model of another vocabulary
    with pytest.raises(UserError, match="has id 300, but the model reads image tokens as 299"):
        evaluate_multiple_choice(small, rows, tokenizer, progress=False)
    with pytest.raises(UserError, match="has id None"):
        evaluate_multiple_choice(model, rows, Tokenizer(models.BPE()), progress=False)
    with pytest.raises(UserError, match="no column answer"):
        evaluate_multiple_choice(model, [{k: v for k, v in rows[0].items() if k != "answer"}], progress=False)
    with pytest.raises(UserError, match="lists no options"):
        evaluate_multiple_choice(model, [{**rows[0], "question": "Why?"}], progress=False)
    with pytest.raises(UserError, match="unknown way"):
        evaluate_multiple_choice(model, rows, ways=("vibes",), progress=False)
    import datasets

    (tmp_path / "other" / "data").mkdir(parents=True)
    parquet = tmp_path / "other" / "data" / "val-00000-of-00001.parquet"
    datasets.Dataset.from_dict({"question": ["?"]}).to_parquet(str(parquet))
    with pytest.raises(UserError, match="not in the MMStar format: no column index, image, answer"):
        load_multiple_choice(tmp_path / "other")


def test_cli_evaluates_a_folder(tokenizer: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    write_shapes_vqa(tmp_path / "vqa", n_train=2, n_val=1, n_multiple_choice=6, size=32)
    assert len(load_multiple_choice(tmp_path / "vqa" / "mmstar")) == 6
    monkeypatch.setattr(picovlm, "load", lambda path, device="cpu": favouring(tokenizer, {"A": 100.0}))
    out = tmp_path / "report.json"
    assert main(["eval-mc", "--model", "any", "--data", str(tmp_path / "vqa" / "mmstar"), "--limit", "5",
                 "--batch-size", "2", "--device", "cpu", "--json", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_questions"] == 5 and "questions" not in summary
    assert len(json.loads(out.read_text())["questions"]) == 5
    assert summary["likelihood"]["accuracy"] == summary["generate"]["accuracy"]
