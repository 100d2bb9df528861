"""picovlm measure-memory: peaks of a training step and of generation from fresh processes, both families."""

from __future__ import annotations

import json

import pytest

from picovlm.cli import main
from picovlm.errors import UserError
from picovlm.memory import format_table, parse_batch_sizes

TINY_SUPRAVL = ["img_size=32", "cnn_channels=[4,8,16]", "cnn_grid=2", "lm_hidden_dim=32", "lm_n_heads=2",
                "lm_n_blocks=2", "lm_inter_dim=64", "lm_vocab_size=300", "lm_max_text_len=20"]
# tests/test_nanovlm.py's tiny_nanovlm, over the nanovlm-222m preset
TINY_NANOVLM = ["img_size=32", "vit_img_size=32", "vit_patch_size=8", "vit_hidden_dim=32", "vit_inter_dim=64",
                "vit_n_heads=2", "vit_n_blocks=2", "mp_pixel_shuffle_factor=2", "lm_hidden_dim=32",
                "lm_inter_dim=64", "lm_n_heads=4", "lm_n_kv_heads=2", "lm_n_blocks=2", "lm_vocab_size=50",
                "lm_max_position_embeddings=256"]


# Every measurement is a fresh process (~3-5 s, mostly importing torch): the second family gets one batch size.
@pytest.mark.parametrize(("preset", "sets", "sizes"), [("supravl-nano", TINY_SUPRAVL, [1, 4]),
                                                       ("nanovlm-222m", TINY_NANOVLM, [2])])
def test_peaks_per_batch_size(preset: str, sets: list[str], sizes: list[int],
                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["measure-memory", "--preset", preset, "--batch-sizes", ",".join(map(str, sizes)), "--device", "cpu",
            "--json"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"preset", "family", "device", "precision", "unit", "measure", "params", "baseline_mib", "rows",
            "text_tokens", "new_tokens", "steps"} <= set(report)
    assert report["family"] == preset.split("-")[0] and report["unit"] == "MiB"
    assert [r["batch_size"] for r in report["rows"]] == sizes
    base = report["baseline_mib"]
    for row in report["rows"]:
        for phase in ("train", "generate"):
            assert row[f"{phase}_peak_mib"] >= base[phase] > 0  # a fresh process: at least the model's own
    peaks = [r["train_peak_mib"] for r in report["rows"]]
    assert peaks == sorted(peaks)  # a larger batch needs at least as much
    table = format_table(report)
    assert "| batch size | training step peak | generation peak |" in table and f"| {sizes[-1]} | " in table


def test_bad_settings_are_user_errors() -> None:
    assert parse_batch_sizes("1, 8,32") == [1, 8, 32]
    for text in ("1,x", "0,2", ""):
        with pytest.raises(UserError, match="--batch-sizes"):
            parse_batch_sizes(text)
    assert main(["measure-memory", "--preset", "supravl-nano", "--device", "tpu"]) == 2
    assert main(["measure-memory", "--preset", "supravl-nano", "--text-tokens", "49"]) == 2  # > lm_max_text_len
