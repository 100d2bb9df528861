"""Generation: KV-cache decoding equals full recomputation; batching, limits and EOS behave."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import picovlm
from picovlm.data.flickr8k import load_split
from picovlm.errors import UserError
from picovlm.generate import (
    BleuReferences,
    GenerationConfig,
    _beam_search,
    _consensus,
    _most_expected_bleu,
    _ngram_counts,
    _PrefixSession,
    _ViewsSession,
    decode,
    generate,
    generate_from_visual,
    preprocess,
    sentence_bleu,
    views,
)
from picovlm.kv_cache import KVCache
from picovlm.models.supravl import SupraVL
from tests.conftest import tiny_config

STRATEGY_CASES = [
    GenerationConfig(strategy="greedy"),
    GenerationConfig(strategy="beam", beam_width=3),
    GenerationConfig(strategy="beam", beam_width=4, length_penalty=1.0),
    GenerationConfig(strategy="mbr", beam_width=4),
    GenerationConfig(strategy="sample", temperature=1.1, seed=7),
    GenerationConfig(strategy="topk", top_k=20, temperature=0.9, seed=7),
    GenerationConfig(strategy="topp", top_p=0.8, temperature=1.2, seed=7),
    GenerationConfig(strategy="beam", beam_width=3, mirror=True),
    GenerationConfig(strategy="topk", top_k=20, temperature=0.9, seed=7, mirror=True),
    GenerationConfig(strategy="mbr", beam_width=4, mirror=True, center_crop=0.8, mbr_temperature=2.0),
    GenerationConfig(strategy="greedy", center_crop=0.6),
]


@pytest.fixture(scope="module")
def model_and_pixels(trained_run: Path, shapes_dir: Path) -> tuple[SupraVL, torch.Tensor]:
    model = picovlm.load(str(trained_run / "best"))
    dev = load_split(shapes_dir, "dev")
    return model, preprocess([dev.image_dir / n for n in dev.names[:8]], model)


@pytest.mark.parametrize("gen", STRATEGY_CASES,
                         ids=lambda g: f"{g.strategy}-{g.length_penalty}-{g.mirror}-{g.center_crop}")
def test_cache_gives_the_tokens_of_full_recomputation(model_and_pixels, gen: GenerationConfig) -> None:
    model, pixels = model_and_pixels
    cached = generate(model, pixels, gen)
    gen_full = GenerationConfig(**{**gen.__dict__, "use_cache": False})
    assert cached == generate(model, pixels, gen_full)
    assert any(len(ids) > 2 for ids in cached)


def test_untrained_model_cache_equality_on_long_sequences() -> None:
    """A random model rarely emits <eos>, so this runs to the context limit with the cache full."""
    torch.manual_seed(1)
    model = SupraVL(tiny_config()).eval()
    pixels = torch.randn(3, 3, 32, 32)
    for gen in STRATEGY_CASES:
        cached = generate(model, pixels, gen)
        assert cached == generate(model, pixels, GenerationConfig(**{**gen.__dict__, "use_cache": False}))
        assert max(len(ids) for ids in cached) == model.cfg.lm_max_text_len  # stopped at the context limit


def test_sentence_bleu_on_hand_computed_cases() -> None:
    assert sentence_bleu([1, 2, 3, 4, 5], [[1, 2, 3, 4, 5]]) == pytest.approx(1.0)
    # precisions 4/5, then smoothed (3+1)/(4+1), (2+1)/(3+1), (1+1)/(2+1); equal lengths, no penalty
    expected = (4 / 5 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert sentence_bleu([1, 2, 3, 4, 5], [[1, 2, 3, 4, 6]]) == pytest.approx(expected)
    # every n-gram found (1/1 where there are none), but half the closest reference's length
    assert sentence_bleu([1, 2], [[1, 2, 3, 4], [9] * 7]) == pytest.approx(np.exp(1 - 4 / 2))
    # the closest reference sets the penalty, not the shortest; at equal distance the shorter one
    assert sentence_bleu([1, 2, 3], [[1, 2, 3, 4], [1]]) == pytest.approx(np.exp(1 - 4 / 3))
    assert sentence_bleu([1, 2, 3, 4], [[1, 2, 3, 4, 5, 6], [1, 2]]) == pytest.approx(1.0)  # not exp(1 - 6 / 4)
    # counts clipped by the reference that holds most of each n-gram: 2 of the three 7s count
    assert sentence_bleu([7, 7, 7], [[7, 1, 2], [7, 7, 3]]) == pytest.approx((2 / 3 * 2 / 3 * 1 / 2) ** 0.25)
    assert sentence_bleu([1, 2, 3], [[4, 5, 6]]) == 0.0
    assert sentence_bleu([], [[1]]) == 0.0


def test_prepared_references_score_every_candidate_as_sentence_bleu_does() -> None:
    # mbr prepares a reference set once and scores all beams against it: the prepared set must not
    # change between candidates, and its scores must be sentence_bleu's, with or without the counts
    rng = np.random.default_rng(0)
    sentences = [rng.integers(1, 6, size=rng.integers(1, 9)).tolist() for _ in range(40)]
    for start in range(0, 40, 5):
        references = sentences[start:start + 3]
        prepared = BleuReferences(references)
        for candidate in sentences + [[]]:
            expected = sentence_bleu(candidate, references)
            assert prepared.score(candidate) == expected
            assert prepared.score(candidate, _ngram_counts(candidate)) == expected
    assert BleuReferences([]).score([1, 2]) == 0.0
    # and the pick is the candidate with the highest weighted sum of those scores
    candidates, evidence = sentences[:8], [sentences[i:i + 5] for i in range(8, 38, 5)]
    weights = rng.random(len(evidence)).tolist()
    expected_bleu = [sum(w * sentence_bleu(c, refs) for refs, w in zip(evidence, weights)) for c in candidates]
    assert _most_expected_bleu(candidates, evidence, weights) == candidates[int(np.argmax(expected_bleu))]


def test_mbr_keeps_the_candidate_the_others_agree_with() -> None:
    # the top beam shares nothing; the caption that appears twice agrees fully with its twin
    assert _consensus([[7, 8, 9], [1, 2, 3, 4, 6], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]) == [1, 2, 3, 4, 5]
    assert _consensus([[1, 2, 3], [4, 5, 6]]) == [1, 2, 3]  # a tie keeps the more probable beam
    assert _consensus([[4, 5]]) == [4, 5]


class MarkovSession:
    """A stand-in language model whose next-token log-probabilities depend on the last token only."""

    def __init__(self, log_probs: torch.Tensor, start: torch.Tensor):
        self.log_probs, self.start = log_probs, start

    def prefill(self) -> torch.Tensor:
        return self.log_probs[self.start[:, -1]]

    def step(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.log_probs[seqs[:, -1]]

    def select_rows(self, rows: torch.Tensor) -> None:
        pass  # no state to reorder


def _three_caption_model() -> tuple[torch.Tensor, int, int]:
    """Markov log-probs with three captions after <bos> (0): [2] (p 0.4), [3, 5, 6] (0.35) and
    [4, 5, 6] (0.25), each then <eos> (1); the last two share "5 6"."""
    bos, eos, vocab = 0, 1, 8
    moves = {bos: {2: 0.4, 3: 0.35, 4: 0.25}, 2: {eos: 1.0}, 3: {5: 1.0}, 4: {5: 1.0}, 5: {6: 1.0}, 6: {eos: 1.0}}
    log_probs = torch.full((vocab, vocab), -30.0)  # everything else all but impossible
    for token, following in moves.items():
        for nxt, p in following.items():
            log_probs[token, nxt] = math.log(p)
    return log_probs, bos, eos


def test_mbr_differs_from_beam_where_the_top_beam_is_the_odd_one_out() -> None:
    log_probs, bos, eos = _three_caption_model()
    start = torch.tensor([[bos], [bos]])
    for strategy, expected in (("beam", [2]), ("mbr", [3, 5, 6])):
        gen = GenerationConfig(strategy=strategy, beam_width=3)
        assert decode(MarkovSession(log_probs, start), start, gen, eos, 10) == [expected, expected]


def test_beam_search_returns_each_beams_summed_log_prob() -> None:
    log_probs, bos, eos = _three_caption_model()
    start = torch.tensor([[bos]])
    seqs, scores = _beam_search(MarkovSession(log_probs, start), start, GenerationConfig(beam_width=3), eos, 10)
    assert seqs[0, :, 1:3].tolist() == [[2, eos], [3, 5], [4, 5]]
    torch.testing.assert_close(scores[0], torch.tensor([0.4, 0.35, 0.25]).log())


def test_expected_bleu_mbr_weighs_the_beams_by_their_probability() -> None:
    log_probs, bos, eos = _three_caption_model()
    start = torch.tensor([[bos]])
    # a cold temperature trusts the top beam alone; at T = 1 the two captions sharing "5 6" hold
    # 0.6 of the mass: [3, 5, 6] expects 0.35 + 0.25 * BLEU([3, 5, 6], [4, 5, 6]) = 0.52 > 0.4
    for temperature, expected in ((0.05, [2]), (1.0, [3, 5, 6])):
        gen = GenerationConfig(strategy="mbr", beam_width=3, mbr_temperature=temperature)
        assert decode(MarkovSession(log_probs, start), start, gen, eos, 10) == [expected]
    # itself counted with BLEU 1: a candidate nobody else resembles can still win on its own weight
    three = [[1, 2, 3], [4, 5, 6, 7], [4, 5, 6, 8]]
    alone = [[c] for c in three]  # each candidate, alone, as references
    assert _most_expected_bleu(three, alone, [0.6, 0.2, 0.2]) == [1, 2, 3]
    assert _most_expected_bleu(three, alone, [0.4, 0.3, 0.3]) == [4, 5, 6, 7]
    assert _most_expected_bleu([[1, 2], [3, 4]], [[[1, 2]], [[3, 4]]], [0.5, 0.5]) == [1, 2]  # a tie: the first


def test_mbr_of_one_beam_is_greedy(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    one = GenerationConfig(strategy="mbr", beam_width=1)  # nothing to compare: beam search of width 1
    assert generate(model, pixels, one) == generate(model, pixels, GenerationConfig(strategy="greedy"))


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_batched_equals_one_at_a_time(model_and_pixels, strategy: str) -> None:
    model, pixels = model_and_pixels
    gen = GenerationConfig(strategy=strategy)
    batched = generate(model, pixels, gen)
    assert batched == [generate(model, pixels[i:i + 1], gen)[0] for i in range(len(pixels))]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "mbr"])
def test_mirror_decodes_from_both_views_alike(model_and_pixels, strategy: str) -> None:
    """The image and its mirror are the same two views, so they get the same caption; each is
    decoded on its own in a batch; and the average of the views is not the first view alone."""
    model, pixels = model_and_pixels
    gen = GenerationConfig(strategy=strategy, beam_width=4, mirror=True)
    mirrored = generate(model, pixels, gen)
    assert mirrored == generate(model, pixels.flip(-1), gen)
    assert mirrored == [generate(model, pixels[i:i + 1], gen)[0] for i in range(len(pixels))]



def test_mirror_averages_the_log_probs_of_the_two_views(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    visual = model.encode_images(torch.cat([pixels, pixels.flip(-1)]))  # (2B, P, D)
    B = len(pixels)
    start = torch.full((2 * B, 1), model.cfg.bos_token_id)
    session = _ViewsSession(_PrefixSession(model, visual, start, use_cache=True), n_views=2, n_rows=B)
    views = [F.log_softmax(model.next_token_logits(start[:B], v), dim=-1) for v in (visual[:B], visual[B:])]
    averaged = session.prefill()  # (B, V)
    torch.testing.assert_close(averaged, (views[0] + views[1]) / 2)
    assert not torch.allclose(averaged, views[0], atol=1e-3)  # the mirror changes what the model reads


def test_views_are_the_image_its_mirror_and_the_centre_crop_of_each() -> None:
    """An 8x8 image whose middle 4x4 is one colour: the centre crop of half its side is that
    colour everywhere, enlarged; the image is not symmetric, so its mirror is another view."""
    image = torch.zeros(1, 3, 8, 8)
    image[..., 2:6, 2:6] = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1)
    image[..., 0, 0] = 3.0  # one corner marked
    seen = views(image, GenerationConfig(mirror=True, center_crop=0.5))  # (4, 3, 8, 8)
    assert seen.shape == (4, 3, 8, 8) and GenerationConfig(mirror=True, center_crop=0.5).n_views == 4
    torch.testing.assert_close(seen[0], image[0])
    torch.testing.assert_close(seen[1], image[0].flip(-1))
    torch.testing.assert_close(seen[2], image[0, :, 2:3, 2:3].expand(3, 8, 8))
    torch.testing.assert_close(seen[3], seen[2].flip(-1))
    noise = torch.randn(2, 3, 8, 8)  # asymmetric everywhere: which view sits where shows
    four, two = (views(noise, GenerationConfig(mirror=mirror, center_crop=0.75)) for mirror in (True, False))
    torch.testing.assert_close(four[2:4], noise.flip(-1))
    torch.testing.assert_close(four[4:6], two[2:4])  # the crops, after the image and its mirror
    torch.testing.assert_close(four[6:8], two[2:4].flip(-1))
    assert not torch.allclose(two[2:4], noise, atol=0.1)
    assert views(image, GenerationConfig(center_crop=0.5)).shape == (2, 3, 8, 8)
    torch.testing.assert_close(views(image, GenerationConfig()), image)
    # A crop that keeps 6 of 8 pixels each way starts at pixel 1: the marked corner falls outside.
    assert views(image, GenerationConfig(center_crop=0.75))[1].max() < 3.0


@pytest.mark.parametrize("strategy", ["greedy", "mbr"])
def test_centre_crop_decodes_each_image_from_its_four_views(model_and_pixels, strategy: str) -> None:
    """Each image's caption comes from its own four views wherever it sits in the batch; the image
    and its mirror have the same four views, so the same caption; the crop changes what is read."""
    model, pixels = model_and_pixels
    gen = GenerationConfig(strategy=strategy, beam_width=4, mirror=True, center_crop=0.7)
    captions = generate(model, pixels, gen)
    assert captions == [generate(model, pixels[i:i + 1], gen)[0] for i in range(len(pixels))]
    assert captions == generate(model, pixels.flip(-1), gen)
    B = len(pixels)
    visual = model.encode_images(views(pixels, gen))  # (4B, P, D)
    start = torch.full((4 * B, 1), model.cfg.bos_token_id)
    session = _ViewsSession(_PrefixSession(model, visual, start, use_cache=True), n_views=4, n_rows=B)
    each = [F.log_softmax(model.next_token_logits(start[:B], visual[k * B:(k + 1) * B]), dim=-1) for k in range(4)]
    torch.testing.assert_close(session.prefill(), sum(each) / 4)
    assert not torch.allclose(each[2], each[0], atol=1e-3)  # the crop is not the image again
    with pytest.raises(ValueError, match="4 views per image"):
        generate_from_visual(model, visual[:-1], gen)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    gen = GenerationConfig(strategy="topk", top_k=50, temperature=2.0, seed=123)
    assert generate(model, pixels, gen) == generate(model, pixels, gen)
    other = GenerationConfig(strategy="topk", top_k=50, temperature=2.0, seed=124)
    assert generate(model, pixels, gen) != generate(model, pixels, other)


def test_max_new_tokens_and_eos(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    for n in (0, 1, 3):
        out = generate(model, pixels, GenerationConfig(strategy="greedy", max_new_tokens=n))
        assert all(len(ids) <= n for ids in out)
    out = generate(model, pixels, GenerationConfig(strategy="greedy"))
    eos = model.cfg.eos_token_id
    assert all(eos not in ids for ids in out)  # cut at the first <eos>
    assert all(len(ids) < model.cfg.lm_max_text_len for ids in out)  # the trained model stops early


def test_topp_with_tiny_p_is_greedy(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    greedy = generate(model, pixels, GenerationConfig(strategy="greedy"))
    assert generate(model, pixels, GenerationConfig(strategy="topp", top_p=1e-6, seed=0)) == greedy
    assert generate(model, pixels, GenerationConfig(strategy="topk", top_k=1, seed=0)) == greedy


def test_sample_draws_from_the_whole_distribution(model_and_pixels) -> None:
    model, pixels = model_and_pixels  # top-k over every token is the same distribution, so the same draws
    whole = GenerationConfig(strategy="topk", top_k=model.cfg.lm_vocab_size, temperature=3.0, seed=1)
    sampled = generate(model, pixels, GenerationConfig(strategy="sample", temperature=3.0, seed=1))
    assert sampled == generate(model, pixels, whole)
    assert sampled != generate(model, pixels, GenerationConfig(strategy="topk", top_k=2, temperature=3.0, seed=1))


def test_bad_generation_settings_are_user_errors(model_and_pixels) -> None:
    model, pixels = model_and_pixels
    with pytest.raises(UserError, match="unknown strategy"):
        generate(model, pixels, GenerationConfig(strategy="nucleus"))
    with pytest.raises(UserError, match="temperature"):
        generate(model, pixels, GenerationConfig(strategy="topk", temperature=0))
    with pytest.raises(UserError, match="mbr temperature .* must be > 0"):
        generate(model, pixels, GenerationConfig(strategy="mbr", mbr_temperature=0))
    with pytest.raises(UserError, match="strategy 'beam' has none"):
        generate(model, pixels, GenerationConfig(strategy="beam", mbr_temperature=4))
    for share in (0, 1, 1.5, -0.2):
        with pytest.raises(UserError, match="centre crop .* between 0 and 1"):
            generate(model, pixels, GenerationConfig(center_crop=share))


def test_in_effect_names_the_settings_each_strategy_reads() -> None:
    assert GenerationConfig(strategy="greedy", beam_width=5, top_k=3).in_effect() == {}
    assert GenerationConfig(top_p=0.5, seed=1).in_effect() == {"beam_width": 3, "length_penalty": 0.0}
    assert GenerationConfig(strategy="topk", seed=3, mirror=True).in_effect() == {
        "temperature": 1.0, "top_k": 50, "seed": 3, "mirror": True}
    assert GenerationConfig(strategy="mbr", beam_width=8, mbr_neighbours=30, center_crop=0.8,
                            max_new_tokens=12).in_effect() == {
        "beam_width": 8, "length_penalty": 0.0, "mbr_neighbours": 30, "max_new_tokens": 12, "center_crop": 0.8}


def test_kv_cache_overflow_is_refused() -> None:
    cache = KVCache(n_layers=1, batch_size=1, n_heads=1, max_len=4, head_dim=2)
    cache.update(0, torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))
    cache.advance(4)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))


def test_pil_images_get_the_pixels_of_their_files(model_and_pixels, tmp_path: Path) -> None:
    """A PIL image in memory is converted like a file: transparency over white, not dropped."""
    model, _ = model_and_pixels
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[:20, :, :3] = (200, 30, 30)
    rgba[:20, :, 3] = 255  # top half an opaque red, bottom half fully transparent black
    image = Image.fromarray(rgba, mode="RGBA")
    image.save(tmp_path / "half.png")
    from_file = preprocess([tmp_path / "half.png"], model)
    torch.testing.assert_close(preprocess([image], model), from_file)
    white = preprocess([Image.new("RGB", (40, 40), (255, 255, 255))], model)
    torch.testing.assert_close(from_file[..., -5:, :], white[..., -5:, :])  # transparent rows are white


def test_captions_read_their_files_one_batch_at_a_time(model_and_pixels, shapes_dir: Path, monkeypatch) -> None:
    """caption_images never holds more than a batch of decoded images (a whole split would take
    GBs), and gives the captions one batch of all the images gives."""
    import picovlm.generate as generate_module

    model, _ = model_and_pixels
    dev = load_split(shapes_dir, "dev")
    paths = [dev.image_dir / n for n in dev.names[:5]]
    whole = model.caption(paths, strategy="greedy", batch_size=64)
    sizes: list[int] = []

    def counting(images: list[Path], model: SupraVL) -> torch.Tensor:
        sizes.append(len(images))
        return preprocess(images, model)

    monkeypatch.setattr(generate_module, "preprocess", counting)
    assert model.caption(paths, strategy="greedy", batch_size=2) == whole
    assert sizes == [2, 2, 1]
    assert model.caption(str(paths[0]), strategy="greedy") == whole[:1]  # one path, not a list
