"""The README's commands and code run as written (paths swapped for test data), so it cannot rot."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from picovlm.cli import build_parser

README = (Path(__file__).parent.parent / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_opening_commands_are_the_scripts_ci_runs() -> None:
    first = _blocks("bash")[0]
    assert "bash scripts/demo.sh" in first and "bash scripts/test.sh" in first
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_every_picovlm_command_line_parses() -> None:
    joined = [block.replace("\\\n", " ") for block in _blocks("bash")]  # continuation lines
    lines = [ln.split("#")[0].strip() for block in joined for ln in block.splitlines()]
    commands = [ln for ln in lines if ln.startswith(".venv/bin/picovlm")]
    assert len(commands) >= 3
    for line in commands:
        build_parser().parse_args(shlex.split(line)[1:])  # SystemExit on an unknown flag


def test_python_snippets_run(tmp_path: Path, trained_run: Path, shapes_dir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    image = str(next((shapes_dir / "Images").iterdir()))
    use, train = _blocks("python")
    use = use.replace("runs/demo/best", str(trained_run / "best")).replace("photo.jpg", image)
    use = use.replace("/path/to/data", str(shapes_dir))
    exec(compile(use, "README-use", "exec"), {})
    assert (tmp_path / "export" / "my-model" / "model.safetensors").is_file()
    assert (tmp_path / "export" / "my-model" / "neighbours.safetensors").is_file()
    train = train.replace("/path/to/flickr8k", str(shapes_dir)).replace("TrainConfig(epochs=15)",
                                                                          "TrainConfig(epochs=15, max_steps=2)")
    scope: dict = {}
    exec(compile(train, "README-train", "exec"), scope)
    assert scope["summary"]["steps"] == 2 and (tmp_path / "runs" / "flickr8k" / "best").is_dir()
