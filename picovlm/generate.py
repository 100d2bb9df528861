"""Caption generation: greedy, top-k, top-p, beam search and its consensus pick (mbr), batched, with a KV cache.

Every strategy runs the same two phases:

    prefill  [visual tokens, <bos>]  (B, P + 1)  -> logits for the first word   (B, V)
    decode   one new token per row   (B, 1)      -> logits for the next word    (B, V)

until every row has produced <eos> or the context is full. With `use_cache=False` each
decode step instead recomputes the whole sequence; it exists to check the cache (both give
the same tokens) and as the baseline in `benchmarks/`.

Beam search keeps all beams of all images in one (B * W, ...) batch. Its defaults choose
what the published SupraVL-Nano `generate_beam` chooses: candidates ranked by the sum of
log-probabilities, a finished beam kept as one candidate, stop once every beam has ended.
`length_penalty` > 0 ranks by score / ((5 + length) / 6) ** length_penalty instead (GNMT).

"mbr" (minimum Bayes risk) runs the same beam search and then, of each image's W final beams,
keeps the one the others agree with most: the highest sentence BLEU-4 against the other beams
as its references, on token ids. The most probable caption is often not the one with most
in common with the other likely captions; the metrics reward the second kind. With
`mbr_neighbours` K the beams are scored against the captions of the K training images that look
most like the image to the model instead (picovlm.neighbours).

Any strategy can also read each image in several views and rank the next tokens by the mean of
the views' log-probabilities (test-time augmentation, views()): the image and its mirror (`mirror`),
and the centre crop of each enlarged back to full size (`center_crop`, a share of the side).

A caller that names no strategy gets the model's own decoding: the settings its checkpoint stores
in generation_config.json (`model.generation`), else beam search of width 3 (resolve_generation).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from picovlm.data.images import load_image, normalize, resize_square, to_rgb
from picovlm.errors import UserError
from picovlm.models.supravl import SupraVL
from picovlm.neighbours import INDEX_FILE, image_features

STRATEGIES = ("greedy", "beam", "mbr", "sample", "topk", "topp")


@dataclass
class GenerationConfig:
    strategy: str = "beam"
    max_new_tokens: int | None = None  # None: fill the context
    beam_width: int = 3
    length_penalty: float = 0.0
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9
    seed: int | None = None  # for the sampling strategies
    use_cache: bool = True
    mirror: bool = False  # also read each image mirrored and average the two views' next-token log-probs
    # Also read the centre crop of each image (and of its mirror) covering this share of its side,
    # enlarged back to the input size: a closer view, averaged in like the mirror. None: no crop.
    center_crop: float | None = None
    # mbr: None picks the beam most like the others (consensus); T > 0 the beam with the highest
    # expected BLEU-4 against a beam drawn with probability softmax(log-prob / T) (Kumar & Byrne 2004)
    mbr_temperature: float | None = None
    # mbr: K > 0 scores each beam by its mean BLEU-4 against the captions of each of the K training images
    # nearest to the image in the model's own visual features (the checkpoint's index, picovlm.neighbours)
    mbr_neighbours: int | None = None

    @classmethod
    def from_dict(cls, settings: Any, source: str) -> GenerationConfig:
        """A checked GenerationConfig from JSON settings (a checkpoint's generation_config.json)."""
        fix = "fix it, or delete it to decode with picovlm's defaults"
        if not isinstance(settings, dict):
            raise UserError(f"{source} is not a JSON object of decoding settings; {fix}")
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(f"{source} has unknown decoding settings ({', '.join(unknown)}); {fix}")
        gen = cls(**settings)
        try:
            gen.validate()
        except UserError as e:
            raise UserError(f"{source}: {e}; {fix}") from None
        except TypeError:  # a number given as text, say: the comparisons in validate() fail
            raise UserError(f"{source} holds a setting of the wrong type ({settings}); {fix}") from None
        return gen

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.beam_width < 1 or self.top_k < 1 or not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise UserError("need beam_width >= 1, top_k >= 1, 0 < top_p <= 1 and temperature > 0")
        if self.center_crop is not None and not 0 < self.center_crop < 1:
            raise UserError(f"the centre crop (--center-crop) is a share of the image's side, between 0 and 1 "
                            f"(0.8 keeps the middle 80 %), got {self.center_crop}")
        if self.mbr_temperature is not None:
            if not self.mbr_temperature > 0:
                raise UserError(f"mbr temperature (--mbr-temperature) must be > 0, got {self.mbr_temperature}")
            if self.strategy != "mbr":
                # Refused rather than ignored: a weighting that silently does nothing reads as a result.
                raise UserError(f"the mbr temperature (--mbr-temperature) weighs mbr's beams; strategy "
                                f"{self.strategy!r} has none: add --strategy mbr or leave the temperature out")
        if self.mbr_neighbours is not None:
            if self.mbr_neighbours < 1 or self.strategy != "mbr":
                raise UserError(f"--mbr-neighbours K scores mbr's beams against the captions of K >= 1 training "
                                f"images; got K = {self.mbr_neighbours} with strategy {self.strategy!r}: use "
                                f"--strategy mbr and K >= 1, or leave it out")
            if self.mbr_temperature is not None:
                raise UserError("mbr scores its beams against each other (--mbr-temperature) or against the "
                                "neighbours' captions (--mbr-neighbours), not both: leave one out")

    def in_effect(self) -> dict[str, Any]:
        """The settings that change what this strategy decodes, unset ones (None, False) left out:
        a beam search's top_k is ignored, say, and so is left out of the description of a run."""
        own = {"greedy": (), "beam": ("beam_width", "length_penalty"),
               "mbr": ("beam_width", "length_penalty", "mbr_temperature", "mbr_neighbours"),
               "sample": ("temperature", "seed"), "topk": ("temperature", "top_k", "seed"),
               "topp": ("temperature", "top_p", "seed")}[self.strategy]
        settings = {name: getattr(self, name) for name in (*own, "max_new_tokens", "mirror", "center_crop")}
        return {name: value for name, value in settings.items() if value is not None and value is not False}

    @property
    def n_views(self) -> int:
        """Views decoded together per image: itself, [its mirror], [the centre crop of each]."""
        return (1 + self.mirror) * (1 + (self.center_crop is not None))


class DecodingSession(Protocol):
    """What the strategies below need from a model: logits for the first new token, then for the
    next one after each step, and a way to keep only some rows (beam search). SupraVL's session
    is below; NanoVLM brings its own (picovlm.models.nanovlm)."""

    def prefill(self) -> torch.Tensor: ...  # (B, V) logits of the first new token

    def step(self, seqs: torch.Tensor) -> torch.Tensor: ...  # seqs (N, t): start + new tokens -> (N, V)

    def select_rows(self, rows: torch.Tensor) -> None: ...  # keep these rows, in this order


class _PrefixSession:
    """SupraVL: [visual tokens, <bos>] first, then one token per step, through a KV cache or by
    full recomputation."""

    def __init__(self, model: SupraVL, visual: torch.Tensor, start: torch.Tensor, use_cache: bool):
        self.model, self.visual, self.start, self.use_cache = model, visual, start, use_cache
        self.cache = model.new_cache(visual.shape[0]) if use_cache else None

    def prefill(self) -> torch.Tensor:
        return self.model.next_token_logits(self.start, self.visual, self.cache)  # (B, V)

    def step(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (N, t): all tokens so far, the newest last -> logits (N, V)."""
        if self.cache is not None:
            return self.model.next_token_logits(seqs[:, -1:], None, self.cache)
        return self.model.next_token_logits(seqs, self.visual)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)  # with a cache, the visual prefix lives in it already
        else:
            self.visual = self.visual.index_select(0, rows)


class _ViewsSession:
    """Test-time augmentation: each image seen in several views (see views()), the
    next-token log-probabilities averaged over its views, so every strategy decodes one caption
    per image from the views' agreement. The inner session holds view k of row i at k * N + i."""

    def __init__(self, inner: DecodingSession, n_views: int, n_rows: int):
        self.inner, self.n_views, self.n_rows = inner, n_views, n_rows

    def _average(self, logits: torch.Tensor) -> torch.Tensor:  # (n_views * N, V) -> (N, V)
        return F.log_softmax(logits.float(), dim=-1).view(self.n_views, self.n_rows, -1).mean(dim=0)

    def prefill(self) -> torch.Tensor:
        return self._average(self.inner.prefill())

    def step(self, seqs: torch.Tensor) -> torch.Tensor:
        return self._average(self.inner.step(seqs.repeat(self.n_views, 1)))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.inner.select_rows(torch.cat([rows + k * self.n_rows for k in range(self.n_views)]))
        self.n_rows = rows.shape[0]


def _max_steps(model: SupraVL, gen: GenerationConfig) -> int:
    limit = model.cfg.lm_max_text_len  # the longest text input is <bos> + (limit - 1) tokens
    return limit if gen.max_new_tokens is None else max(0, min(gen.max_new_tokens, limit))


def views(images: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """images (B, 3, H, W) -> (gen.n_views * B, 3, H, W), view after view: the images, their mirrors
    (gen.mirror), then the images' centre crops enlarged back to H x W (gen.center_crop) and, with
    gen.mirror, the mirrors of those."""
    seen = [images, images.flip(-1)] if gen.mirror else [images]
    if gen.center_crop is not None:
        H, W = images.shape[-2:]
        h, w = round(H * gen.center_crop), round(W * gen.center_crop)
        top, left = (H - h) // 2, (W - w) // 2
        closer = F.interpolate(images[..., top:top + h, left:left + w], size=(H, W), mode="bilinear",
                               antialias=True, align_corners=False)  # linear: as if done before normalising
        seen += [closer, closer.flip(-1)] if gen.mirror else [closer]
    return torch.cat(seen)


@torch.inference_mode()
def generate(model: SupraVL, images: torch.Tensor, gen: GenerationConfig | None = None) -> list[list[int]]:
    """images (B, 3, H, W) normalised -> B token lists (no <bos>, cut before <eos>)."""
    model.eval()
    gen = gen or GenerationConfig()
    gen.validate()  # before the views are cut
    return generate_from_visual(model, model.encode_images(views(images, gen)), gen)  # visual (V*B, P, D)


@torch.inference_mode()
def generate_from_visual(model: SupraVL, visual: torch.Tensor, gen: GenerationConfig | None = None
                         ) -> list[list[int]]:
    """generate() for images already encoded: visual (B, P, D) -> B token lists. With several views
    (gen.mirror, gen.center_crop), visual is (V * B, P, D), the views of the B images one after
    another, as views() lays them out."""
    gen = gen or GenerationConfig()
    gen.validate()
    model.eval()
    start = torch.full((visual.shape[0], 1), model.cfg.bos_token_id, dtype=torch.long, device=visual.device)
    session: DecodingSession = _PrefixSession(model, visual, start, gen.use_cache)
    if gen.n_views > 1:
        if visual.shape[0] % gen.n_views:
            raise ValueError(f"{gen.n_views} views per image need visual tokens for each: a batch of a multiple "
                             f"of {gen.n_views}, got {visual.shape[0]}")
        start = start[:visual.shape[0] // gen.n_views]
        session = _ViewsSession(session, n_views=gen.n_views, n_rows=start.shape[0])
    evidence = None
    if gen.mbr_neighbours is not None:
        if model.neighbours is None:
            raise UserError(f"--mbr-neighbours needs the model's caption index ({INDEX_FILE} in its folder), and "
                            f"this model has none: build it with 'picovlm index --model DIR --data PATH'")
        first_view = visual[:start.shape[0]]  # (B, P, D): the images as they are
        evidence = model.neighbours.nearest_captions(image_features(first_view), gen.mbr_neighbours)
    return decode(session, start, gen, model.cfg.eos_token_id, _max_steps(model, gen), evidence)


def decode(session: DecodingSession, start: torch.Tensor, gen: GenerationConfig, eos: int,
           n_steps: int, evidence: list[list[list[list[int]]]] | None = None) -> list[list[int]]:
    """Run a strategy for up to n_steps new tokens; start (B, 1) is the token before them.
    Returns the new tokens of each row, cut before its first <eos>. For mbr, `evidence` replaces
    the beams as what each beam is scored against: for each row, reference sets (the captions of
    each of its nearest training images), weighed alike."""
    if gen.strategy in ("beam", "mbr"):
        seqs, log_probs = _beam_search(session, start, gen, eos, n_steps)  # (B, W, 1 + t), (B, W)
        rows_of_images = seqs[:, :, 1:].tolist()  # best first
        if gen.strategy == "beam":
            return [_cut(rows[0], eos) for rows in rows_of_images]
        beams = [[_cut(row, eos) for row in rows] for rows in rows_of_images]
        if evidence is not None:  # each image's K neighbours, weighed alike
            return [_most_expected_bleu(rows, ref_sets, [1 / len(ref_sets)] * len(ref_sets))
                    for rows, ref_sets in zip(beams, evidence)]
        if gen.mbr_temperature is None:
            return [_consensus(rows) for rows in beams]
        weights = (log_probs.float() / gen.mbr_temperature).softmax(dim=-1).tolist()
        return [_most_expected_bleu(rows, [[row] for row in rows], w) for rows, w in zip(beams, weights)]
    return [_cut(row, eos) for row in _sample(session, start, gen, eos, n_steps)[:, 1:].tolist()]


def _cut(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos)] if eos in row else row


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    """The n-grams of a sequence of words or token ids, in order."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def sentence_bleu(candidate: list[int], references: list[list[int]]) -> float:
    """BLEU-4 of one token sequence against references, as the corpus metric counts it (n-gram
    counts clipped by their most frequent reference, brevity penalty from the reference of the
    closest length), with add-one smoothing of the 2- to 4-gram precisions (Lin & Och 2004), so
    that one sentence without a shared 4-gram does not score 0."""
    return BleuReferences(references).score(candidate)


def _ngram_counts(tokens: Sequence) -> list[Counter]:
    """[1-gram counts, ..., 4-gram counts] of a sequence."""
    return [Counter(ngrams(tokens, n)) for n in range(1, 5)]


class BleuReferences:
    """A reference set prepared for sentence_bleu: each n-gram's largest count in any one
    reference (what a candidate's count of it is clipped to) and the references' lengths.
    mbr scores every beam against the same sets, so it prepares each set once. Works on any
    sequences of hashable items: token ids here, words in picovlm.significance."""

    def __init__(self, references: Sequence[Sequence]):
        self.clip: list[Counter] = [Counter() for _ in range(4)]  # clip[n - 1]: n-gram -> largest count
        for ref in references:
            for clip, counts in zip(self.clip, _ngram_counts(ref)):
                clip |= counts  # | keeps each n-gram's largest count
        self.lengths = [len(ref) for ref in references]

    def statistics(self, candidate: Sequence, counts: list[Counter] | None = None) -> tuple[list[int], int]:
        """What corpus BLEU sums over a split for one candidate: its clipped n-gram matches for
        n = 1..4, and the length of the reference closest to its own (the shorter on a tie)."""
        matched = [sum(min(c, clip.get(g, 0)) for g, c in found.items())
                   for clip, found in zip(self.clip, counts or _ngram_counts(candidate))]
        closest = min(self.lengths, key=lambda length: (abs(length - len(candidate)), length), default=0)
        return matched, closest

    def score(self, candidate: Sequence, counts: list[Counter] | None = None) -> float:
        """sentence_bleu(candidate, the references); `counts`: _ngram_counts(candidate), if known."""
        if not candidate or not self.lengths:
            return 0.0
        matched, closest = self.statistics(candidate, counts)
        if matched[0] == 0:  # no word in common: 0, as unsmoothed unigram precision says
            return 0.0
        log_precision = 0.0
        for n, found in enumerate(matched, start=1):
            smooth = 0 if n == 1 else 1
            log_precision += math.log((found + smooth) / (max(len(candidate) - n + 1, 0) + smooth)) / 4
        brevity = min(0.0, 1.0 - closest / len(candidate))
        return math.exp(brevity + log_precision)


def _consensus(candidates: list[list[int]]) -> list[int]:
    """The candidate with the highest BLEU-4 against all the others; the higher-ranked on a tie."""
    if len(candidates) < 2:
        return candidates[0] if candidates else []
    agreement = [sentence_bleu(c, candidates[:i] + candidates[i + 1:]) for i, c in enumerate(candidates)]
    return candidates[max(range(len(candidates)), key=agreement.__getitem__)]


def _most_expected_bleu(candidates: list[list[int]], evidence: list[list[list[int]]],
                       weights: list[float]) -> list[int]:
    """The candidate with the highest expected BLEU-4 against a set of references drawn from
    `evidence` by `weights` (each candidate alone, itself scoring BLEU 1; or each neighbour's
    captions); the higher-ranked on a tie."""
    reference_sets = [BleuReferences(refs) for refs in evidence]  # each prepared once, for all candidates
    expected = []
    for candidate in candidates:
        counts = _ngram_counts(candidate)
        expected.append(sum(w * refs.score(candidate, counts) for refs, w in zip(reference_sets, weights)))
    return candidates[max(range(len(candidates)), key=expected.__getitem__)]


def _pick_next(logits: torch.Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> torch.Tensor:
    """(N, V) logits -> (N,) token ids by the configured strategy."""
    if gen.strategy == "greedy":
        return logits.argmax(dim=-1)
    logits = logits / gen.temperature  # "sample": from the whole distribution
    if gen.strategy == "topk":
        kth = logits.topk(min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif gen.strategy == "topp":  # keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= gen.top_p  # mass before it is enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=rng).squeeze(-1)


def _sample(session: DecodingSession, start: torch.Tensor, gen: GenerationConfig, eos: int,
            n_steps: int) -> torch.Tensor:
    B, dev = start.shape[0], start.device
    rng = torch.Generator(device=dev).manual_seed(gen.seed) if gen.seed is not None else None
    seqs = start
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    logits = session.prefill() if n_steps else None
    for step in range(n_steps):
        nxt = _pick_next(logits, gen, rng).masked_fill(finished, eos)  # (B,)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        finished |= nxt == eos
        if finished.all() or step == n_steps - 1:
            break
        logits = session.step(seqs)
    return seqs


def _beam_search(session: DecodingSession, start: torch.Tensor, gen: GenerationConfig, eos: int,
                 n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> every image's W final beams, best first, (B, W, 1 + t) with start, and their summed
    log-probabilities (B, W). (After the first step every slot holds a beam: the one live beam
    alone has W expansions, and logits are finite.)"""
    B, W, dev = start.shape[0], gen.beam_width, start.device
    seqs = start
    if n_steps == 0:
        return seqs[:, None].expand(B, W, 1), torch.zeros(B, W, device=dev)
    logits = session.prefill()  # (B, V): the W beams of an image start identical,
    session.select_rows(torch.arange(B, device=dev).repeat_interleave(W))  # so prefill once
    logits, seqs = logits.repeat_interleave(W, dim=0), seqs.repeat_interleave(W, dim=0)  # (B*W, ...)
    scores = torch.full((B, W), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live beam to start with, as in the reference
    finished = torch.zeros(B, W, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, W, device=dev)
    first_slot = (torch.arange(W, device=dev) == 0).view(1, 1, W)
    for step in range(n_steps):
        logp = F.log_softmax(logits, dim=-1).view(B, W, -1)  # (B, W, V)
        top_lp, top_tok = logp.topk(W, dim=-1)  # (B, W, W): W expansions per beam
        cand_score = scores[..., None] + top_lp
        cand_len = (lengths + 1)[..., None].expand(B, W, W)
        # A finished beam contributes itself once (first slot), unchanged; its other slots are empty.
        done = finished[..., None]
        cand_score = torch.where(done, torch.where(first_slot, scores[..., None], float("-inf")), cand_score)
        cand_tok = torch.where(done, eos, top_tok)
        cand_len = torch.where(done, lengths[..., None], cand_len)
        rank = cand_score if gen.length_penalty == 0 else cand_score / ((5 + cand_len) / 6) ** gen.length_penalty
        # Stable sort: among equal scores the earlier candidate wins, as Python's sorted() does.
        order = rank.view(B, W * W).sort(dim=-1, descending=True, stable=True).indices[:, :W]  # (B, W)
        parent = order // W
        token = cand_tok.view(B, W * W).gather(1, order)
        scores = cand_score.view(B, W * W).gather(1, order)
        lengths = cand_len.reshape(B, W * W).gather(1, order)
        finished = finished.gather(1, parent) | (token == eos)
        rows = (torch.arange(B, device=dev)[:, None] * W + parent).view(-1)  # (B*W,) parents
        seqs = torch.cat([seqs.index_select(0, rows), token.view(-1, 1)], dim=1)
        if finished.all() or step == n_steps - 1:
            break
        session.select_rows(rows)
        logits = session.step(seqs)
    return seqs.view(B, W, -1), scores


ImageLike = str | Path | Image.Image


def preprocess(images: Sequence[ImageLike] | torch.Tensor, model: SupraVL) -> torch.Tensor:
    """Paths or PIL images -> (B, 3, S, S) normalised float on the model's device."""
    device = next(model.parameters()).device
    if isinstance(images, torch.Tensor):
        return images.to(device)
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    size = model.cfg.img_size
    arrays = [resize_square(to_rgb(im) if isinstance(im, Image.Image) else load_image(im), size)
              for im in images]
    batch = torch.from_numpy(np.stack(arrays))  # (B, S, S, 3) uint8
    return normalize(batch, model.cfg.img_mean, model.cfg.img_std).to(device)


def resolve_generation(model: SupraVL, strategy: str | None = None, **given: Any) -> GenerationConfig:
    """The decoding to run: with no strategy named, the model's own (`model.generation`, read from its
    checkpoint's generation_config.json; empty: GenerationConfig's defaults); with one named, that
    strategy on GenerationConfig's defaults, because settings chosen for one strategy (an mbr
    temperature, say) may not fit another. Each setting in `given` that is not None goes on top."""
    settings = dict(model.generation) if strategy is None else {"strategy": strategy}
    settings.update({k: v for k, v in given.items() if v is not None})
    gen = GenerationConfig(**settings)
    gen.validate()
    return gen


def caption_images(model: SupraVL, images: Sequence[ImageLike] | torch.Tensor, strategy: str | None = None,
                   batch_size: int = 64, **kwargs: Any) -> list[str]:
    """Captions for images, in order. kwargs are GenerationConfig fields; see resolve_generation."""
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer attached; load it with picovlm.load")
    gen = resolve_generation(model, strategy, **kwargs)
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    captions: list[str] = []
    for start in range(0, len(images), batch_size):  # decode a batch's files only when it is its turn:
        pixels = preprocess(images[start:start + batch_size], model)  # a split at once would take GBs
        captions += [model.tokenizer.decode(ids) for ids in generate(model, pixels, gen)]
    return captions
