"""Evaluation plumbing on hand-made captions whose scores are known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from picovlm.cli import main
from picovlm.evaluate import coco_metrics, diversity_metrics

REFS = [["a dog runs on the green grass"], ["two children swim in a blue pool"], ["a man rides a red bike"]]


def test_perfect_captions_score_one_and_disjoint_ones_zero() -> None:
    perfect = coco_metrics(REFS, [r[0] for r in REFS])
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert perfect[name] == pytest.approx(1.0, abs=1e-6), name
    assert perfect["METEOR"] > 0.9 and perfect["CIDEr"] > 5.0
    disjoint = coco_metrics(REFS, ["xylophone quartz", "zebra jelly", "violin mango"])
    assert all(disjoint[k] == pytest.approx(0.0, abs=1e-6) for k in ("BLEU-1", "ROUGE-L", "CIDEr"))


def test_known_partial_scores() -> None:
    # "a dog runs" vs "a dog runs on the green grass": unigram precision 1, brevity penalty exp(1 - 7/3);
    # ROUGE-L: LCS 3, P = 1, R = 3/7, beta 1.2 -> (1 + 1.44) P R / (R + 1.44 P).
    import math

    scores = coco_metrics(REFS[:1], ["a dog runs"])
    assert scores["BLEU-1"] == pytest.approx(math.exp(1 - 7 / 3), rel=1e-4)
    p, r = 1.0, 3 / 7
    assert scores["ROUGE-L"] == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), rel=1e-6)


def test_diversity_metrics_exact() -> None:
    d = diversity_metrics(["a dog runs", "a dog runs", "a cat sits"], train_captions=["A dog runs ."])
    assert d["distinct-1"] == pytest.approx(5 / 9)  # {a, dog, runs, cat, sits} of 9 words
    assert d["distinct-2"] == pytest.approx(4 / 6)  # {a dog, dog runs, a cat, cat sits} of 6 bigrams
    assert d["vocabulary"] == 5 and d["unique_captions"] == pytest.approx(2 / 3)
    assert d["copied_from_train"] == pytest.approx(2 / 3) and d["mean_length"] == 3.0


def test_eval_cli_writes_report(tmp_path: Path, trained_run: Path, shapes_dir: Path,
                                capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--model", str(trained_run / "best"), "--data", str(shapes_dir), "--limit", "8",
                 "--strategy", "greedy", "--json", "--out", str(tmp_path / "report")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 8 and 0 < summary["metrics"]["BLEU-1"] <= 1
    low, high = summary["intervals"]["BLEU-1"]
    assert low <= summary["metrics"]["BLEU-1"] <= high and "METEOR" not in summary["intervals"]
    assert (tmp_path / "report" / "examples.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| BLEU-1 |" in report and f"| {100 * low:.1f}-{100 * high:.1f} |" in report
    assert len(json.loads((tmp_path / "report" / "eval.json").read_text())["captions"]) == 8


def test_eval_runs_the_checkpoints_own_decoding_unless_told_otherwise(tmp_path: Path, trained_run: Path,
                                                                     shapes_dir: Path, capsys) -> None:
    import shutil

    model_dir = tmp_path / "m"
    shutil.copytree(trained_run / "best", model_dir)
    (model_dir / "generation_config.json").write_text('{"strategy": "mbr", "beam_width": 4, "mirror": true}')
    args = ["eval", "--model", str(model_dir), "--data", str(shapes_dir), "--limit", "4", "--json"]
    runs = {}
    for name, flags in (("stored", []), ("width 2", ["--beam-width", "2", "--no-mirror"]),
                        ("beam", ["--strategy", "beam"])):
        assert main([*args, *flags]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    decodings = {name: (run["strategy"], run["generation"]["beam_width"], run["generation"]["mirror"])
                 for name, run in runs.items()}
    # a named strategy starts from picovlm's defaults, not from settings stored for another one
    assert decodings == {"stored": ("mbr", 4, True), "width 2": ("mbr", 2, False), "beam": ("beam", 3, False)}
    assert main(args[:-1]) == 0  # as text: the settings that took effect, not every field
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("mbr decoding, beam_width 4, length_penalty 0.0, mirror True"), first
