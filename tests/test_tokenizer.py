"""Tokenizer: fixed special ids, clean round trips, trained on the captions it is given."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from picovlm.tokenizer import CaptionTokenizer, clean_caption

CAPTIONS = ["A dog runs on the grass .", "Two children play in the water .", "A man 's hat is red , and blue !",
            "A black dog jumps over a log .", "The girl in a pink dress climbs the stairs ."] * 20


def test_clean_caption() -> None:
    assert clean_caption("  A dog runs  on the grass . ") == "a dog runs on the grass"
    assert clean_caption("A man 's hat is red , and blue !") == "a man's hat is red, and blue!"


def test_special_ids_and_vocab_size(tmp_path: Path) -> None:
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=320)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert [tok.tokenizer.id_to_token(i) for i in range(3)] == ["<pad>", "<bos>", "<eos>"]
    assert tok.vocab_size <= 320
    tok.save(tmp_path / "tokenizer.json")
    again = CaptionTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.encode("a dog runs") == tok.encode("a dog runs")


def test_encode_adds_bos_eos_and_decode_is_clean() -> None:
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=320)
    ids = tok.encode("A man 's hat is red , and blue !")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "a man's hat is red, and blue!"
    assert tok.decode([*tok.encode("a dog")[:-1], 2, *tok.encode("junk")[1:]]) == "a dog"  # stops at <eos>
    assert len(tok.encode("a dog runs on the grass", max_len=3)) == 3


def test_common_words_become_single_tokens() -> None:
    tok = CaptionTokenizer.train(CAPTIONS, vocab_size=400)
    assert len(tok.encode("a dog runs on the grass")) <= 2 + 6


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
               min_size=1, max_size=40))
def test_round_trip_of_any_clean_text(text: str) -> None:
    """Byte-level BPE: any text, even unseen characters, decodes back to its cleaned form."""
    tok = _TOK
    cleaned = clean_caption(text)
    assert tok.decode(tok.encode(text)) == cleaned.strip()


_TOK = CaptionTokenizer.train(CAPTIONS, vocab_size=320)


def test_word_level_keeps_common_words_and_drops_rare_ones(tmp_path: Path) -> None:
    n_words = len({w for c in CAPTIONS for w in clean_caption(c).split()})  # each seen 20 times or more
    tok = CaptionTokenizer.train(CAPTIONS + ["a zebra"], vocab_size=4 + n_words, kind="word")
    assert tok.vocab_size == 4 + n_words and tok.tokenizer.id_to_token(3) == "<unk>"
    ids = tok.encode("A black dog jumps over the zebra .")
    assert len(ids) == 2 + 7  # one token per word, <bos> and <eos>
    assert ids.count(3) == 1  # "zebra", seen once, is not among the commonest words
    assert tok.decode(ids[1:]) == "a black dog jumps over the"  # <unk> is dropped
    tok.save(tmp_path / "tokenizer.json")
    assert CaptionTokenizer.from_file(tmp_path / "tokenizer.json").encode("a dog runs") == tok.encode("a dog runs")
