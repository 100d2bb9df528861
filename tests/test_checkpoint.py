"""Checkpoints: exact round trips, the published config format, atomic saves, Hub upload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import picovlm
from picovlm import hub
from picovlm.checkpoint import from_pretrained, save_pretrained
from picovlm.errors import UserError
from picovlm.io import atomic_dir, find_complete_dir


def test_round_trip_is_exact(tmp_path: Path, trained_run: Path) -> None:
    model = from_pretrained(trained_run / "best")
    save_pretrained(model, tmp_path / "copy", metrics={"val_loss": 1.0})
    again = picovlm.load(str(tmp_path / "copy"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.lm_head.weight is again.tok_emb.weight
    assert again.tokenizer.encode("a red circle") == model.tokenizer.encode("a red circle")
    card = (tmp_path / "copy" / "README.md").read_text()
    assert "Unique parameters" in card and "| val_loss | 1.0 |" in card


def test_a_stored_decoding_round_trips_and_is_what_caption_runs(tmp_path: Path, trained_run: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    import picovlm.generate as generate_mod
    from picovlm.generate import GenerationConfig, resolve_generation

    model = from_pretrained(trained_run / "best")
    assert model.generation == {} and not (trained_run / "best" / "generation_config.json").exists()
    assert resolve_generation(model) == GenerationConfig()  # no file: beam search, width 3
    decoding = {"strategy": "mbr", "beam_width": 4, "mirror": True, "mbr_temperature": 2.0}
    model.generation = decoding
    save_pretrained(model, tmp_path / "m")
    again = picovlm.load(str(tmp_path / "m"))
    assert again.generation == decoding
    assert "strategy=mbr, beam_width=4, mirror=True, mbr_temperature=2.0" in (tmp_path / "m" / "README.md").read_text()
    stored = GenerationConfig(**decoding)
    assert resolve_generation(again) == stored
    assert resolve_generation(again, beam_width=6, mirror=False) == GenerationConfig(
        **{**decoding, "beam_width": 6, "mirror": False})  # settings given go on top ...
    assert resolve_generation(again, "beam") == GenerationConfig(strategy="beam")  # ... a named strategy starts afresh
    seen: list[GenerationConfig] = []
    real_generate = generate_mod.generate
    monkeypatch.setattr(generate_mod, "generate", lambda m, px, gen: seen.append(gen) or real_generate(m, px, gen))
    image = Image.new("RGB", (40, 40), "red")
    again.caption([image])
    again.caption([image], strategy="greedy")
    assert seen == [stored, GenerationConfig(strategy="greedy")]


def test_a_hub_download_brings_the_stored_decoding(tmp_path: Path, trained_run: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub download keeps generation_config.json: a local folder in the repo's layout stands in
    for the network, and snapshot_download's file filter is applied as the Hub applies it."""
    import fnmatch
    import shutil

    import huggingface_hub

    repo = tmp_path / "repo"
    shutil.copytree(trained_run / "best", repo)
    (repo / "generation_config.json").write_text('{"strategy": "mbr", "beam_width": 5}')
    (repo / "notes.txt").write_text("not a checkpoint file")

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        local = tmp_path / "cache" / repo_id.replace("/", "--")
        local.mkdir(parents=True)
        for f in repo.iterdir():
            if any(fnmatch.fnmatch(f.name, pattern) for pattern in allow_patterns):
                shutil.copy(f, local / f.name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = picovlm.load("me/tiny")
    assert model.generation == {"strategy": "mbr", "beam_width": 5}
    assert not (tmp_path / "cache" / "me--tiny" / "notes.txt").exists()


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[8]", "is not a JSON object of decoding settings"),
    ('{"beam_size": 8}', "has unknown decoding settings \\(beam_size\\)"),
    ('{"strategy": "nucleus"}', "unknown strategy 'nucleus'"),
    ('{"beam_width": "8"}', "a setting of the wrong type"),
])
def test_a_malformed_generation_config_is_a_clear_error(tmp_path: Path, trained_run: Path, text: str,
                                                        message: str) -> None:
    import shutil

    shutil.copytree(trained_run / "best", tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(text)
    with pytest.raises(UserError, match=message) as error:
        from_pretrained(tmp_path / "m")
    assert "generation_config.json" in str(error.value) and "delete it" in str(error.value)


def test_published_config_without_picovlm_keys_loads(tmp_path: Path, trained_run: Path) -> None:
    """A config.json with only the release's keys (as the published model ships) is enough."""
    import shutil

    shutil.copytree(trained_run / "best", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    original = from_pretrained(tmp_path / "m").cfg
    published = {k: cfg[k] for k in ("D_MODEL", "N_HEADS", "N_LAYERS", "D_FF", "VIS_CH", "N_VIS", "VOCAB_SIZE",
                                     "MAX_SEQ", "IMG_SIZE", "bos_token_id", "eos_token_id")}
    (tmp_path / "m" / "config.json").write_text(json.dumps(published))
    loaded = from_pretrained(tmp_path / "m").cfg
    assert (loaded.cnn_channels, loaded.cnn_grid, loaded.lm_hidden_dim) == (original.cnn_channels,
                                                                            original.cnn_grid, original.lm_hidden_dim)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path: Path, trained_run: Path) -> None:
    model = from_pretrained(trained_run / "best")
    save_pretrained(model, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(OSError), atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind


def test_crash_between_renames_is_recovered(tmp_path: Path, trained_run: Path) -> None:
    model = from_pretrained(trained_run / "best")
    save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # the state after the first rename of a swap
    assert find_complete_dir(tmp_path / "ckpt") == tmp_path / "ckpt.old"
    assert picovlm.load(str(tmp_path / "ckpt")).cfg == model.cfg


def test_push_to_hub_uploads_the_checkpoint_files(tmp_path: Path, trained_run: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    class RecordingApi:  # stands in for the network; the folder handling is what is under test
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            calls["upload"] = (repo_id, folder_path, sorted(allow_patterns))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = hub.push_to_hub(trained_run / "best", "me/tiny", private=True)
    assert url.endswith("me/tiny") and calls["create"] == ("me/tiny", True, True)
    assert calls["upload"][2] == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                  "neighbours.safetensors", "tokenizer.json"]  # its decoding and index go too
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no model.safetensors"):
        hub.push_to_hub(tmp_path / "empty", "me/empty")


def test_hub_download_offline_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot download 'SupraLabs/SupraVL-Nano-900k'"):
        picovlm.load("SupraLabs/SupraVL-Nano-900k")


def test_model_methods_mirror_the_functions(tmp_path: Path, trained_run: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from picovlm.models.supravl import SupraVL

    model = SupraVL.from_pretrained(trained_run / "best")
    model.save_pretrained(tmp_path / "m")
    assert SupraVL.from_pretrained(tmp_path / "m").cfg == model.cfg
    uploaded = []
    monkeypatch.setattr(hub, "push_to_hub", lambda folder, repo_id, **kw: uploaded.append(
        sorted(p.name for p in Path(folder).iterdir())) or f"https://huggingface.co/{repo_id}")
    assert model.push_to_hub("me/m").endswith("me/m")
    assert uploaded == [["README.md", "config.json", "model.safetensors", "tokenizer.json"]]
