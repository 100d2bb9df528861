"""Streamed training data: WebDataset tar shards and Hugging Face datasets (local files only)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from picovlm.config import TrainConfig
from picovlm.data.flickr8k import load_split
from picovlm.data.shards import write_shards
from picovlm.data.stream import StreamBatches, is_stream
from picovlm.distributed import DistInfo
from picovlm.errors import UserError
from picovlm.tokenizer import CaptionTokenizer
from picovlm.train import train
from tests.conftest import ctrl_c_during_step, tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(shapes_dir, out, per_shard=50)
    return out


def _tokenizer(shapes_dir: Path) -> CaptionTokenizer:
    train_set = load_split(shapes_dir, "train")
    return CaptionTokenizer.train((c for caps in train_set.captions for c in caps), 300)


def _captions_seen(batches: StreamBatches, tokenizer: CaptionTokenizer, batch_size: int = 8) -> list[str]:
    return [tokenizer.decode(row.tolist()) for b in batches.epoch(batch_size, seed=None) for row in b.input_ids]


def test_shards_hold_every_pair_once(shards: Path, shapes_dir: Path) -> None:
    train_set = load_split(shapes_dir, "train")
    n_pairs = sum(len(caps) for caps in train_set.captions)
    tars = sorted((shards / "train").glob("*.tar"))
    assert len(tars) == -(-n_pairs // 50) and is_stream(shards) and not is_stream(shapes_dir)
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
    assert names[0].endswith(".jpg") and names[1].endswith(".txt") and names[0][:-4] == names[1][:-4]


def test_processes_and_workers_read_disjoint_shares(shards: Path, shapes_dir: Path) -> None:
    tok = _tokenizer(shapes_dir)
    cfg = tiny_config()
    everything = _captions_seen(StreamBatches(str(shards), "train", tok, cfg), tok)
    per_rank = [_captions_seen(StreamBatches(str(shards), "train", tok, cfg, DistInfo(r, 2), num_workers=2), tok)
                for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert 0.3 < len(per_rank[0]) / len(everything) < 0.7
    batch = next(StreamBatches(str(shards), "train", tok, cfg).epoch(8, seed=1))
    assert batch.images.shape == (8, 32, 32, 3) and batch.input_ids.shape == batch.targets.shape


def test_shuffle_changes_with_the_epoch_seed(shards: Path, shapes_dir: Path) -> None:
    tok = _tokenizer(shapes_dir)
    stream = StreamBatches(str(shards), "train", tok, tiny_config(), shuffle_buffer=100)
    first = [next(stream.epoch(8, seed=s)).input_ids.tolist() for s in (1, 1, 2)]
    assert first[0] == first[1] != first[2]


def test_train_on_shards_with_workers(tmp_path: Path, shards: Path) -> None:
    tc = TrainConfig(max_steps=40, batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, num_workers=2)
    summary = train(tiny_config(), tc, tmp_path / "run", data_dir=shards, progress_bar=False)
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert summary["steps"] == 40 and losses[-1] < losses[0] - 1.0
    assert summary["best_val_loss"] < 5 and (tmp_path / "run" / "best" / "tokenizer.json").is_file()


def test_stream_needs_max_steps(tmp_path: Path, shards: Path) -> None:
    with pytest.raises(UserError, match="--max-steps"):
        train(tiny_config(), TrainConfig(batch_size=16), tmp_path / "run", data_dir=shards, progress_bar=False)


def test_unreadable_image_in_a_shard_is_skipped(tmp_path: Path, shards: Path, shapes_dir: Path) -> None:
    folder = tmp_path / "broken"
    (folder / "train").mkdir(parents=True)
    src = sorted((shards / "train").glob("*.tar"))[0]
    with tarfile.open(src) as tar_in, tarfile.open(folder / "train" / "000000.tar", "w") as tar_out:
        for i, member in enumerate(tar_in.getmembers()):
            data = tar_in.extractfile(member).read()
            if i == 0:
                data = b"not an image"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))
    tok = _tokenizer(shapes_dir)
    with pytest.warns(UserWarning, match="skipped a sample"):
        seen = _captions_seen(StreamBatches(str(folder), "train", tok, tiny_config()), tok)
    assert len(seen) == 49  # 50 samples, one broken


def test_hf_parquet_folder(tmp_path: Path, shapes_dir: Path) -> None:
    datasets = pytest.importorskip("datasets")
    dev = load_split(shapes_dir, "dev")
    rows = {"image": [str(dev.image_dir / n) for n in dev.names[:12]], "caption": [caps for caps in dev.captions[:12]]}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))  # images embedded as bytes
    tok = _tokenizer(shapes_dir)
    stream = StreamBatches(f"hf:{tmp_path / 'pq'}", "train", tok, tiny_config())
    batches = list(stream.epoch(5, seed=None))
    assert [len(b.input_ids) for b in batches] == [5, 5, 2]
    assert batches[0].images.shape == (5, 32, 32, 3) and batches[0].images.float().std() > 10
    assert len(list(stream.captions(12))) == sum(len(c) for c in dev.captions[:12])  # lists give every caption
    with pytest.raises(UserError, match="cannot stream"):
        StreamBatches(f"hf:{tmp_path / 'missing'}", "train", tok, tiny_config())


def test_interrupted_stream_run_resumes_to_identical_weights(tmp_path: Path, shards: Path) -> None:

    import torch
    from safetensors.torch import load_file

    import picovlm.train as train_mod

    tc = TrainConfig(max_steps=20, batch_size=16, lr=2e-3, warmup_steps=3, augment=True, seed=5)
    train(tiny_config(), tc, tmp_path / "full", data_dir=shards, progress_bar=False)
    with ctrl_c_during_step(train_mod, 6), pytest.raises(UserError, match="interrupted after step 7"):
        train(tiny_config(), tc, tmp_path / "cut", data_dir=shards, progress_bar=False)
    assert train(tiny_config(), tc, tmp_path / "cut", data_dir=shards, resume=True, progress_bar=False)["steps"] == 20
    full, resumed = (load_file(str(tmp_path / run / "last" / "model.safetensors")) for run in ("full", "cut"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
