"""Bootstrap intervals and paired comparisons: per-image parts that add up to pycocoevalcap's scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from picovlm.cli import main
from picovlm.evaluate import coco_metrics
from picovlm.significance import METRICS, bootstrap_intervals, image_scores, paired_bootstrap

REFS = [
    ["a dog runs on the green grass", "a brown dog is running outside"],
    ["two children swim in a blue pool", "kids are swimming"],
    ["a man rides a red bike down the road", "a cyclist on a street"],
    ["a woman in a hat sits on a bench", "a lady is sitting in the park"],
    ["a black cat sleeps on the sofa", "a cat is asleep"],
    ["people walk along the beach at sunset", "a crowd on the sand by the sea"],
]
# Lengths on both sides of the references' (the brevity penalty bites), one caption sharing no word.
GOOD = ["a dog runs on the grass", "two kids swim in a pool", "a man rides a bike on the road",
        "a woman sits on a bench in the park", "zebra quartz", "people walk on the beach"]
POOR = ["a dog", "a pool", "a man in a red shirt is standing", "a woman", "a dog is running", "people"]


def test_per_image_parts_add_up_to_pycocoevalcaps_scores() -> None:
    expected = coco_metrics(REFS, GOOD)
    scores = image_scores(REFS, GOOD)
    whole = scores.corpus(np.ones((1, len(GOOD))))
    for name in METRICS:
        assert whole[name][0] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    # BLEU is a ratio of sums, not a mean: it differs from the mean of per-image BLEU here.
    assert whole["BLEU-4"][0] != pytest.approx(np.mean([coco_metrics([r], [g])["BLEU-4"]
                                                        for r, g in zip(REFS, GOOD)]), rel=1e-3)


def test_resample_weights_select_images() -> None:
    scores = image_scores(REFS, GOOD)
    only_two = np.zeros((1, len(GOOD)))
    only_two[0, [0, 3]] = 3.0  # a resample that drew images 0 and 3, three times each
    drawn = scores.corpus(only_two)
    alone = coco_metrics([REFS[0], REFS[3]], [GOOD[0], GOOD[3]])
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L"):  # CIDEr-D's document frequencies come from all six images
        assert drawn[name][0] == pytest.approx(alone[name], rel=1e-6), name
    assert drawn["CIDEr"][0] == pytest.approx(scores.cider[[0, 3]].mean())


def test_bootstrap_intervals_hold_the_score_and_repeat_with_the_seed() -> None:
    expected = coco_metrics(REFS, GOOD)
    intervals = bootstrap_intervals(REFS, GOOD, resamples=300, seed=1)
    assert set(intervals) == set(METRICS)
    for name, (low, high) in intervals.items():
        assert low < expected[name] < high, name
    assert bootstrap_intervals(REFS, GOOD, resamples=300, seed=1) == intervals
    assert bootstrap_intervals(REFS, GOOD, resamples=300, seed=2) != intervals


def test_paired_bootstrap_finds_the_better_system_and_no_difference_between_twins() -> None:
    better = paired_bootstrap(REFS, POOR, GOOD, resamples=300)
    for name in ("BLEU-1", "BLEU-4", "CIDEr"):
        m = better[name]
        assert m["difference"] == pytest.approx(m["b"] - m["a"]) and m["difference"] > 0, name
        assert m["b_ahead"] > 0.9 and m["interval"][0] < m["difference"] < m["interval"][1], name
    assert better["BLEU-4"]["a"] == pytest.approx(coco_metrics(REFS, POOR)["BLEU-4"])
    twins = paired_bootstrap(REFS, GOOD, GOOD, resamples=50)
    assert all(m["difference"] == 0 and m["interval"] == (0.0, 0.0) and m["b_ahead"] == 0 for m in twins.values())
    with pytest.raises(ValueError):
        paired_bootstrap(REFS, GOOD, GOOD[:-1])
    with pytest.raises(ValueError, match="resamples"):  # a clear error, not an IndexError from numpy
        paired_bootstrap(REFS, POOR, GOOD, resamples=0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_intervals(REFS, GOOD, resamples=0)


def _eval_json(folder: Path, captions: list[str], images: list[str] | None = None) -> Path:
    images = images or [f"{i}.jpg" for i in range(len(captions))]
    folder.mkdir()
    rows = [{"image": n, "caption": c, "references": r} for n, c, r in zip(images, captions, REFS)]
    (folder / "eval.json").write_text(json.dumps({"split": "dev", "strategy": "beam", "captions": rows}))
    return folder


def test_compare_cli_prints_the_paired_bootstrap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    poor, good = _eval_json(tmp_path / "poor", POOR), _eval_json(tmp_path / "good", GOOD)
    assert main(["compare", str(poor), str(good / "eval.json"), "--resamples", "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_images"] == 6 and result["a"]["strategy"] == "beam"
    assert result["metrics"]["BLEU-4"]["b"] == pytest.approx(coco_metrics(REFS, GOOD)["BLEU-4"])
    assert main(["compare", str(poor), str(good), "--resamples", "200"]) == 0
    table = capsys.readouterr().out
    assert "BLEU-4" in table and "% of resamples" in table and "METEOR" not in table


def test_compare_cli_refuses_results_it_cannot_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _eval_json(tmp_path / "good", GOOD)
    shuffled = _eval_json(tmp_path / "other", GOOD, images=[f"{i}.jpg" for i in reversed(range(6))])
    broken = tmp_path / "broken.json"
    broken.write_text('{"captions": [')
    for other, message in ((shuffled, "caption different images"), (broken, "not an eval.json"),
                           (tmp_path / "missing", "no eval.json there")):
        assert main(["compare", str(good), str(other)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
