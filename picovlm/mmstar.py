"""MMStar-style multiple-choice evaluation of a NanoVLM, answered two ways.

A row (MMStar's format; `picovlm data make-vqa OUT` writes the same in OUT/mmstar):

    {"index": 0, "question": "What colour is the square?\\nOptions: A: red, B: blue, C: green",
     "image": PIL image, "answer": "A", "category": "...", "l2_category": "..."}

The prompt is one ChatML user turn (picovlm.chat): the image's tokens, the question, and an
instruction to answer with a letter, then the assistant's turn opens:

    <|im_start|>user\\n<|image|>...<|image|>{question}\\n{INSTRUCTION}<|im_end|>\\n<|im_start|>assistant\\n

Prompts are left-padded into (B, T) batches with an attention mask; images (B, 3, S, S) with
S = vit_img_size, normalised with cfg.img_mean / img_std. Two ways of answering:

    likelihood   one forward pass per batch: of the letters this question offers, the one whose
                 token has the highest next-token logit after the prompt
    generate     greedy decoding of a few tokens; the answer is the first option letter standing
                 alone in the output ("B", "(B)", "B: blue"), else the one option whose text the
                 output names; anything else counts as wrong

The report (a JSON-serialisable dict) holds the number of questions and, per way, overall
accuracy and accuracy per category and per l2_category, and every question's prediction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from picovlm.chat import IMAGE_TOKEN, segments
from picovlm.data.images import normalize, resize_square, to_rgb
from picovlm.errors import UserError, first_line

HUB_ID = "Lin-Chen/MMStar"
COLUMNS = ("index", "question", "image", "answer", "category", "l2_category")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
WAYS = ("likelihood", "generate")
LETTERS = "ABCDEFGHIJ"


# --- data ----------------------------------------------------------------------


def load_multiple_choice(source: str | Path = HUB_ID, split: str = "val") -> Any:
    """An MMStar-format split as a `datasets.Dataset`: a local folder (e.g. OUT/mmstar from
    `picovlm data make-vqa OUT`) or a Hub dataset id (default: Lin-Chen/MMStar)."""
    from picovlm.data.stream import import_datasets

    datasets = import_datasets()
    try:
        ds = datasets.load_dataset(str(source), split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise UserError(f"cannot read multiple-choice data {source} ({split}): {first_line(e)}") from None
    check_columns(ds.column_names, str(source))
    return ds


def check_columns(columns: Iterable[str], source: str) -> None:
    """UserError naming the MMStar columns `columns` lacks."""
    columns = list(columns)
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{source} is not in the MMStar format: no column {', '.join(missing)} "
                        f"(it has {', '.join(columns)})")


def parse_options(question: str) -> dict[str, str]:
    """"...\\nOptions: A: red, B: blue, C: green" -> {"A": "red", "B": "blue", "C": "green"}.

    Letters are read in order (A, then ", B: ", ...), so commas inside an option's text are kept."""
    _, sep, tail = question.rpartition("Options:")
    tail = tail.strip()
    if not sep or not tail.startswith("A:"):
        return {}
    starts = [0]
    for letter in LETTERS[1:]:
        at = tail.find(f", {letter}:", starts[-1])
        if at < 0:
            break
        starts.append(at)
    ends = [*starts[1:], len(tail)]
    return {LETTERS[i]: tail[s:e].lstrip(", ")[2:].strip() for i, (s, e) in enumerate(zip(starts, ends))}


def _check_row(row: dict[str, Any], position: int) -> dict[str, str]:
    """The row's options; UserError for a row that cannot be scored."""
    check_columns(row.keys(), f"row {position}")
    options = parse_options(row["question"])
    if len(options) < 2:
        raise UserError(f"question {row['index']} lists no options; expected 'Options: A: ..., B: ...' in its text")
    if str(row["answer"]).strip() not in options:
        raise UserError(f"question {row['index']}: the answer {row['answer']!r} is not one of its options' letters "
                        f"{', '.join(options)}")
    return options


# --- prompts and images ----------------------------------------------------------


def build_prompt(question: str, n_images: int, tokens_per_image: int) -> str:
    """The ChatML prompt, ending where the assistant's answer starts (picovlm.chat's template)."""
    opening, _, _ = segments([{"user": f"{question}\n{INSTRUCTION}", "assistant": ""}], n_images,
                             tokens_per_image)
    return opening[0]


def preprocess_images(images: Sequence[Any], cfg: Any) -> torch.Tensor:
    """PIL images -> (N, 3, vit_img_size, vit_img_size) float32, normalised with cfg.img_mean/img_std."""
    size = cfg.vit_img_size
    if not images:
        return torch.zeros(0, 3, size, size)
    arrays = [resize_square(to_rgb(im), size) for im in images]
    return normalize(torch.from_numpy(np.stack(arrays)), cfg.img_mean, cfg.img_std)


def check_tokenizer(model: Any, tokenizer: Any) -> None:
    """The tokenizer must be the model's: its image token's id is the model's image_token_id."""
    if tokenizer is None or not hasattr(tokenizer, "token_to_id"):
        raise UserError("multiple-choice evaluation needs a NanoVLM with a tokenizers.Tokenizer "
                        "(model.tokenizer, or pass tokenizer=)")
    token_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if token_id != model.image_token_id:
        raise UserError(f"the tokenizer's {IMAGE_TOKEN} has id {token_id}, but the model reads image tokens as "
                        f"{model.image_token_id} (lm_vocab_size); use the tokenizer the model was trained with")


def letter_token_id(tokenizer: Any, letter: str) -> int:
    """The single token an answer letter is written as, right after the assistant's opening."""
    ids = tokenizer.encode(letter, add_special_tokens=False).ids
    if len(ids) != 1:
        raise UserError(f"the tokenizer writes the answer letter {letter!r} as {len(ids)} tokens; the likelihood "
                        f"way needs one token per letter")
    return ids[0]


def encode_batch(rows: Sequence[dict[str, Any]], model: Any, tokenizer: Any
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts: input_ids and attention_mask (B, T), images (N, 3, S, S) in row order
    (N = rows with an image), on the model's device and in its dtype."""
    K, prompts, images = model.tokens_per_image, [], []
    for row in rows:
        n_images = 0 if row["image"] is None else 1
        ids = tokenizer.encode(build_prompt(row["question"], n_images, K), add_special_tokens=False).ids
        if ids.count(model.image_token_id) != n_images * K:
            raise UserError(f"question {row['index']}: its text holds {IMAGE_TOKEN} tokens of its own")
        prompts.append(ids)
        images += [row["image"]] if n_images else []
    T = max(map(len, prompts))
    input_ids = torch.full((len(rows), T), model.cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, ids in enumerate(prompts):  # left padding: every prompt ends at the last column
        input_ids[i, T - len(ids):], mask[i, T - len(ids):] = torch.tensor(ids), 1
    p = next(model.parameters())
    pixels = preprocess_images(images, model.cfg).to(device=p.device, dtype=p.dtype)
    return input_ids.to(p.device), mask.to(p.device), pixels


# --- the two ways of answering ----------------------------------------------------


def next_token_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      images: torch.Tensor) -> torch.Tensor:
    """(B, V) float32 logits of the token after each left-padded prompt: the prefill generation runs."""
    return model.session(input_ids, images, attention_mask, max_new_tokens=0, use_cache=False).prefill()


def likelihood_answers(logits: torch.Tensor, options: Sequence[dict[str, str]], letter_ids: dict[str, int]
                       ) -> list[tuple[str, dict[str, float]]]:
    """Per row, the offered letter with the highest logit, and the offered letters' logits."""
    out = []
    for row_logits, opts in zip(logits, options):
        scores = {letter: row_logits[letter_ids[letter]].item() for letter in opts}
        out.append((max(scores, key=scores.__getitem__), scores))
    return out


def parse_answer(text: str, options: dict[str, str]) -> str | None:
    """The letter a generated answer chose: the first offered letter not inside a word ("B",
    "(B)", "B: blue", "BB"), else the one option whose text it names, else None."""
    letters = "".join(options)
    found = re.search(rf"(?<![A-Za-z])([{letters}])(?![a-z])", text)
    if found:
        return found.group(1)
    named = [letter for letter, option in options.items()
             if option and re.search(rf"\b{re.escape(option.lower())}\b", text.lower())]
    return named[0] if len(named) == 1 else None


# --- the evaluation ---------------------------------------------------------------


@torch.inference_mode()
def evaluate_multiple_choice(model: Any, rows: Iterable[dict[str, Any]], tokenizer: Any = None,
                             batch_size: int = 16, ways: Sequence[str] = WAYS, max_new_tokens: int = 8,
                             progress: bool = True) -> dict[str, Any]:
    """Accuracy of a NanoVLM on MMStar-format rows (a list or a `datasets.Dataset`), per way."""
    from picovlm.generate import GenerationConfig

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    check_tokenizer(model, tokenizer)
    unknown = [w for w in ways if w not in WAYS]
    if unknown or not ways:
        raise UserError(f"unknown way(s) {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    model.eval()
    letter_ids = {letter: letter_token_id(tokenizer, letter) for letter in "ABCD"}  # fail early, before any work
    gen = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens)
    records: list[dict[str, Any]] = []
    total = math.ceil(len(rows) / batch_size) if hasattr(rows, "__len__") else None
    for batch in tqdm(_chunks(rows, batch_size), total=total, desc="multiple choice", unit="batch",
                      disable=not progress):
        options = [_check_row(row, len(records) + i) for i, row in enumerate(batch)]
        for letter in {letter for opts in options for letter in opts} - set(letter_ids):
            letter_ids[letter] = letter_token_id(tokenizer, letter)
        input_ids, mask, images = encode_batch(batch, model, tokenizer)
        batch_records = [_record(row) for row in batch]
        if "likelihood" in ways:
            chosen = likelihood_answers(next_token_logits(model, input_ids, mask, images), options, letter_ids)
            for rec, (letter, scores) in zip(batch_records, chosen):
                rec["likelihood"], rec["letter_logits"] = letter, scores
        if "generate" in ways:
            for rec, opts, new in zip(batch_records, options, model.generate(input_ids, images, mask, gen)):
                rec["generated"] = tokenizer.decode(new, skip_special_tokens=True)
                rec["generate"] = parse_answer(rec["generated"], opts)
        records += batch_records
    if not records:
        raise UserError("no multiple-choice questions to evaluate")
    report: dict[str, Any] = {"n_questions": len(records)}
    for way in ways:
        report[way] = summarize(records, way)
    report["questions"] = records
    return report


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterable[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _record(row: dict[str, Any]) -> dict[str, Any]:
    index = row["index"]
    return {"index": index.item() if hasattr(index, "item") else index, "answer": str(row["answer"]).strip(),
            "category": str(row["category"]), "l2_category": str(row["l2_category"])}


def summarize(records: Sequence[dict[str, Any]], way: str) -> dict[str, Any]:
    """Accuracy overall, per category and per l2_category, with the counts behind each."""
    def score(subset: list[dict[str, Any]]) -> dict[str, Any]:
        correct = sum(r[way] == r["answer"] for r in subset)
        return {"n": len(subset), "correct": correct, "accuracy": correct / len(subset)}

    out = score(list(records))
    for key in ("category", "l2_category"):
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault(r[key], []).append(r)
        out[f"per_{key}"] = {name: score(group) for name, group in sorted(groups.items())}
    return out


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables: accuracy (%) per category and per l2_category, one column per way."""
    ways = [w for w in WAYS if w in report]
    lines = [f"{report['n_questions']} questions"]
    for key in ("category", "l2_category"):
        lines += ["", f"| {key} | n | " + " | ".join(ways) + " |", "|---|---:|" + "---:|" * len(ways)]
        first = report[ways[0]][f"per_{key}"]
        for name, group in first.items():
            cells = [f"{100 * report[w][f'per_{key}'][name]['accuracy']:.1f}" for w in ways]
            lines.append(f"| {name} | {group['n']} | " + " | ".join(cells) + " |")
        cells = [f"**{100 * report[w]['accuracy']:.1f}**" for w in ways]
        lines.append(f"| **overall** | {report['n_questions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def require_nanovlm(model: Any) -> Any:
    """The model, if it can be evaluated here: a NanoVLM (image-token placeholders) with its tokenizer."""
    from picovlm.models.nanovlm import NanoVLM

    if not isinstance(model, NanoVLM):
        raise UserError(f"multiple-choice evaluation needs a NanoVLM (vit + llama), got a {type(model).__name__}; "
                        f"SupraVL models caption images and do not read questions")
    check_tokenizer(model, model.tokenizer)
    return model
