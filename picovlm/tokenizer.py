"""The captioner's tokenizer, trained on the training captions (Hugging Face `tokenizers`).

Special tokens have fixed ids, the published model's defaults: <pad> = 0, <bos> = 1,
<eos> = 2. Two kinds (cfg.lm_tokenizer):

- "bpe" (the default, the published model's): byte-level BPE never meets an unknown
  character, and its decoder gives back exactly the text it was given;
- "word": one token per word (split at spaces), the commonest words of the training captions;
  a rarer word becomes <unk> (id 3), which decoding drops.

Captions are cleaned before training and encoding (see `clean_caption`), so decoded captions
are clean text too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from picovlm.errors import UserError

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2 in this order
UNK = "<unk>"  # (word-level only) id 3: a word outside the vocabulary

_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:'])")
_SPACES = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Lower-case, single spaces, no space before punctuation, no trailing full stop.

    Flickr8k's captions are tokenised text ("a dog runs .", "the man 's hat"); this turns
    them into ordinary sentences so the model learns, and prints, ordinary sentences.
    """
    text = _SPACES.sub(" ", text.strip().lower())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return text.rstrip(" .")


class CaptionTokenizer:
    """A thin wrapper that knows the special-token ids and adds <bos>/<eos>."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise UserError(f"tokenizer has {token} at id {tokenizer.token_to_id(token)}, expected "
                                f"{expected_id}; retrain it with picovlm")
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        # A caption that happens to contain "<eos>" is text, not the end of the sequence.
        tokenizer.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def special_ids(self) -> list[int]:
        """Ids of the tokens that are not words: <pad>, <bos>, <eos>, and <unk> where there is one."""
        unk = self.tokenizer.token_to_id(UNK)
        return [self.pad_id, self.bos_id, self.eos_id, *([] if unk is None else [unk])]

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 2048, kind: str = "bpe") -> CaptionTokenizer:
        """A tokenizer of `kind` ("bpe" or "word") with at most vocab_size tokens, special ones included."""
        if kind == "word":
            tok = Tokenizer(models.WordLevel(unk_token=UNK))
            tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # decoding joins words with spaces
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, UNK],
                                                show_progress=False)
        else:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=SPECIAL_TOKENS,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
        tok.train_from_iterator((clean_caption(c) for c in captions), trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> CaptionTokenizer:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except UserError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise UserError(f"cannot read tokenizer {path}: {e}; re-save the checkpoint folder") from None

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """[<bos>, tokens..., <eos>], cut to max_len tokens (the <eos> is dropped when cut)."""
        ids = [self.bos_id, *self.tokenizer.encode(clean_caption(caption)).ids, self.eos_id]
        return ids[:max_len] if max_len is not None else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids, stopping at the first <eos> and skipping special tokens."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            out.append(int(i))
        return self.tokenizer.decode(out, skip_special_tokens=True).strip()
