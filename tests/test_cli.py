"""The `picovlm` command: each verb works, and every user mistake is one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from picovlm.cli import main
from picovlm.data.flickr8k import load_split


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run picovlm in a fresh process, as a user would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "picovlm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("picovlm: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_info_json_reports_both_counts(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "supravl-nano", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params_unique"] == 698_624 and info["params_with_tied_head"] == 960_768
    assert info["components"]["vis_enc"] == 32_128
    assert main(["info", "supravl-nano"]) == 0
    text = capsys.readouterr().out
    assert "698,624 unique" in text and "960,768 counting the tied lm_head twice" in text


def test_info_with_overrides(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "supravl-nano", "--json", "--set", "lm_n_blocks=6"]) == 0
    assert json.loads(capsys.readouterr().out)["components"]["blocks"] == 2 * 395_904
    assert main(["info", "supravl-nano", "--set", "lm_n_blokcs=6"]) == 2
    assert "unknown config field" in capsys.readouterr().err
    assert main(["info", "supravl-giant"]) == 2
    expected = ("unknown preset 'supravl-giant'; available presets: nanovlm-222m, pico-mobilenet, pico-scratch, "
                "supravl-nano")
    assert expected in capsys.readouterr().err


def test_caption_cli_text_and_json(trained_run: Path, shapes_dir: Path) -> None:
    dev = load_split(shapes_dir, "dev")
    images = [str(dev.image_dir / n) for n in dev.names[:3]]
    result = run_cli("caption", *images, "--model", str(trained_run / "best"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == images and all(len(ln.split("\t")[1]) > 5 for ln in lines)
    for strategy in ("greedy", "mbr", "topk", "topp"):
        assert main(["caption", images[0], "--model", str(trained_run / "best"), "--strategy", strategy,
                     "--seed", "1", "--json"]) == 0
    result = run_cli("caption", images[0], "--model", str(trained_run / "best"), "--json", "--beam-width", "2")
    assert json.loads(result.stdout)[0]["image"] == images[0]


def test_caption_cli_mirror_decodes_from_both_views(trained_run: Path, shapes_dir: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    import picovlm
    import picovlm.generate as generation

    dev = load_split(shapes_dir, "dev")
    image = str(dev.image_dir / dev.names[1])
    views_sessions, views_session = [], generation._ViewsSession
    monkeypatch.setattr(generation, "_ViewsSession", lambda *a, **k: views_sessions.append(k) or views_session(*a, **k))
    assert main(["caption", image, "--model", str(trained_run / "best"), "--mirror", "--json"]) == 0
    assert views_sessions == [{"n_views": 2, "n_rows": 1}]  # the flag reached the decoder
    caption = json.loads(capsys.readouterr().out)[0]["caption"]
    model = picovlm.load(str(trained_run / "best"))
    assert caption == model.caption([image], mirror=True)[0]
    args = ["caption", image, "--model", str(trained_run / "best"), "--center-crop", "0.75"]
    assert main([*args, "--mirror", "--json"]) == 0
    assert views_sessions[-1] == {"n_views": 4, "n_rows": 1}  # the image, its mirror, the crop of each
    caption = json.loads(capsys.readouterr().out)[0]["caption"]
    assert caption == model.caption([image], mirror=True, center_crop=0.75)[0]
    assert_one_line_error(run_cli(*args[:-1], "1.0"), "--center-crop) is a share of the image's side")


def test_caption_cli_mbr_temperature_weighs_the_beams(trained_run: Path, shapes_dir: Path, monkeypatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    import picovlm
    import picovlm.generate as generation

    dev = load_split(shapes_dir, "dev")
    image = str(dev.image_dir / dev.names[1])
    weights, pick = [], generation._most_expected_bleu
    monkeypatch.setattr(generation, "_most_expected_bleu", lambda c, e, w: weights.append(w) or pick(c, e, w))
    args = ["caption", image, "--model", str(trained_run / "best"), "--strategy", "mbr", "--beam-width", "4"]
    assert main(args + ["--json"]) == 0 and weights == []  # without the flag: the consensus rule
    capsys.readouterr()
    assert main(args + ["--mbr-temperature", "2", "--json"]) == 0
    assert len(weights) == 1 and len(weights[0]) == 4 and sum(weights[0]) == pytest.approx(1.0)
    caption = json.loads(capsys.readouterr().out)[0]["caption"]
    model = picovlm.load(str(trained_run / "best"))
    assert caption == model.caption([image], strategy="mbr", beam_width=4, mbr_temperature=2.0)[0]
    assert_one_line_error(run_cli(*args, "--mbr-temperature", "0"), "--mbr-temperature) must be > 0")


def test_caption_errors(tmp_path: Path, trained_run: Path, shapes_dir: Path) -> None:
    good = str(next((shapes_dir / "Images").iterdir()))
    (tmp_path / "broken.jpg").write_text("not a jpeg")
    assert_one_line_error(run_cli("caption", str(tmp_path / "broken.jpg"), "--model", str(trained_run / "best")),
                          "broken.jpg")
    assert_one_line_error(run_cli("caption", good, "--model", str(tmp_path / "no-such-model")),
                          "model folder not found")
    assert_one_line_error(run_cli("caption", good, "--model", "someone/some-model"), "Hugging Face Hub")


def _copy_model(trained_run: Path, dest: Path) -> Path:
    shutil.copytree(trained_run / "best", dest)
    return dest


def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _bad_json(m: Path) -> None:
    (m / "config.json").write_text("{not json")


def _wrong_type(m: Path) -> None:
    _edit_config(m, lambda c: c["picovlm_config"].update(lm_n_blocks="three"))


def _missing_key(m: Path) -> None:
    _edit_config(m, lambda c: [c.pop("picovlm_config"), c.pop("D_MODEL")])


def _wrong_shapes(m: Path) -> None:
    _edit_config(m, lambda c: c["picovlm_config"].update(lm_hidden_dim=64))


def _missing_and_extra_tensors(m: Path) -> None:
    state = load_file(str(m / "model.safetensors"))
    del state["ln_f.weight"]
    state["extra.weight"] = state["ln_f.bias"].clone()
    save_file(state, str(m / "model.safetensors"))


def _pickle_as_weights(m: Path) -> None:
    import torch

    torch.save({"tok_emb.weight": torch.zeros(2)}, m / "model.safetensors")


def _truncated_weights(m: Path) -> None:
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_tokenizer(m: Path) -> None:
    (m / "tokenizer.json").unlink()


@pytest.mark.parametrize("damage, fragments", [
    (_bad_json, ["config.json", "not valid JSON"]),
    (_wrong_type, ["lm_n_blocks", "wrong type"]),
    (_missing_key, ["missing key", "D_MODEL"]),
    (_wrong_shapes, ["shapes do not match"]),
    (_missing_and_extra_tensors, ["ln_f.weight", "extra.weight"]),
    (_pickle_as_weights, ["never loads pickled"]),
    (_truncated_weights, ["model.safetensors", "damaged"]),
    (_no_tokenizer, ["has no tokenizer.json"]),
], ids=lambda x: getattr(x, "__name__", ""))
def test_damaged_checkpoint_is_a_one_line_error(tmp_path: Path, trained_run: Path, shapes_dir: Path,
                                                damage, fragments: list[str]) -> None:
    model = _copy_model(trained_run, tmp_path / "model")
    damage(model)
    image = str(next((shapes_dir / "Images").iterdir()))
    assert_one_line_error(run_cli("caption", image, "--model", str(model)), *fragments)


def test_train_cli_errors(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")),
                          "data folder not found", "captions.txt")
    assert_one_line_error(run_cli("train", "--preset", "nope", "--out", str(tmp_path / "o")), "unknown preset")
    # --feature-crop reaches the training config: refused out of range, and without a cached backbone
    assert_one_line_error(run_cli("train", "--feature-crop", "0", "--out", str(tmp_path / "o")), "in (0, 1]")
    assert_one_line_error(run_cli("train", "--feature-crop", "0.5", "--out", str(tmp_path / "o")),
                          "--feature-crop needs a frozen MobileNetV2")


def test_train_and_data_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "make-shapes", str(tmp_path / "shapes"), "--n-images", "60"]) == 0
    assert (tmp_path / "shapes" / "captions.txt").is_file()
    capsys.readouterr()
    args = ["train", "--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "run"), "--max-steps", "4",
            "--batch-size", "16", "--select-on", "cider", "--no-progress", "--set", "lm_n_blocks=1", "--set",
            "img_size=32"]
    assert main(args) == 0
    assert "best_dev_cider" in json.loads(capsys.readouterr().out)  # --select-on reached the training loop
    assert main([*args[:-4], "--max-steps", "6", "--resume"]) == 0  # the run's own config is kept
    assert json.loads(capsys.readouterr().out)["steps"] == 6
    cfg = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert cfg["N_LAYERS"] == 1 and cfg["IMG_SIZE"] == 32


def test_demo_runs_and_reports_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "15", "--n-images", "80"]) == 0
    out = capsys.readouterr().out
    assert "dev-split accuracy" in out and "exact match" in out
    report = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert set(report["dev_accuracy"]) == {"greedy", "beam"}
    assert 0.0 <= report["dev_accuracy"]["beam"]["attribute_acc"] <= 1.0
