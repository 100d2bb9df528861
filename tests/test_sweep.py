"""Sweeps: every grid combination trains, and the tables and plots describe them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from picovlm.cli import main
from picovlm.errors import UserError
from picovlm.sweep import grid_runs, load_grid


def test_sweep_trains_the_grid_and_writes_tables_plots_and_logs(tmp_path: Path, shapes_dir: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    grid = {"preset": "supravl-nano", "data": str(shapes_dir),
            "train": {"max_steps": 6, "batch_size": 16, "epochs": 2},
            "grid": {"img_size": [32], "lm_hidden_dim": [32], "lm_vocab_size": [300],
                     "cnn_grid": [1, 2], "lm_n_blocks": [1, 2]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert main(["sweep", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out"), "--log", "tensorboard"]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open()))
    assert [(r["cnn_grid"], r["lm_n_blocks"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    by_run = {(r["cnn_grid"], r["lm_n_blocks"]): r for r in rows}
    assert int(by_run[("1", "2")]["decoder_params"]) > int(by_run[("1", "1")]["decoder_params"])
    assert by_run[("1", "1")]["vision_params"] == by_run[("2", "1")]["vision_params"]  # pooling adds nothing
    assert all(float(r["tokens_per_s"]) > 0 and float(r["final_val_loss"]) > 0 for r in rows)
    for name in ("val_loss.png", "tokens_per_s_vs_params.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert "| run |" in (tmp_path / "out" / "sweep.md").read_text()
    assert len(list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))) == 4
    assert "4 runs" in capsys.readouterr().out


def test_grid_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("grid: [1, 2]\n")
    with pytest.raises(UserError, match="needs a 'grid' mapping"):
        load_grid(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("train: {max_stpes: 3}\ngrid: {cnn_grid: [1]}\n")
    with pytest.raises(UserError, match="max_stpes"):
        load_grid(tmp_path / "typo.yaml")
    with pytest.raises(UserError, match="not found"):
        load_grid(tmp_path / "missing.yaml")


def test_shipped_grid_file_is_valid() -> None:
    spec = load_grid(Path(__file__).parent.parent / "sweeps" / "grid-vs-global.yaml")
    assert [name for name, _ in grid_runs(spec)] == ["cnn_grid=1,lm_n_blocks=1", "cnn_grid=1,lm_n_blocks=3",
                                                     "cnn_grid=4,lm_n_blocks=1", "cnn_grid=4,lm_n_blocks=3"]
