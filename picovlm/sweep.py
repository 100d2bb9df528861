"""`picovlm sweep GRID.yaml`: train every combination of some config values, then compare them.

A grid file names a preset, optional data, training settings, and lists of values for model
config fields; every combination is one run:

    preset: supravl-nano
    data: null                 # null: the built-in shapes dataset
    train: {max_steps: 400, lr: 0.001}
    grid:
      cnn_grid: [1, 4]         # one global visual token vs the published 4x4 grid
      lm_n_blocks: [1, 3]

Outputs in the sweep folder: `sweep.csv` and `sweep.md` (parameters per component, final and
best val loss, text tokens/s, training time), `val_loss.png` (val loss over steps, every run),
`tokens_per_s_vs_params.png`, and each run's own folder under `runs/`. With `--log tensorboard`
each run's metrics are also written as TensorBoard scalars (needs the `tensorboard` package).
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from picovlm.config import TrainConfig, get_preset
from picovlm.errors import UserError
from picovlm.models.supravl import SupraVL
from picovlm.train import train

_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}


def load_grid(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"sweep file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or not spec["grid"]:
        raise UserError(f"{path}: needs a 'grid' mapping of config fields to lists of values")
    unknown = set(spec.get("train") or {}) - _TRAIN_FIELDS
    if unknown:
        raise UserError(f"{path}: unknown train setting(s) {sorted(unknown)}")
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid field {key!r} needs a non-empty list of values")
    return spec


def grid_runs(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(run name, config overrides)] for every combination in the grid."""
    keys = list(spec["grid"])
    runs = []
    for values in itertools.product(*(spec["grid"][k] for k in keys)):
        overrides = dict(zip(keys, values))
        runs.append((",".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()), overrides))
    return runs


def _run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name.replace("/", "_")


def _component_params(model: SupraVL) -> dict[str, int]:
    counts = model.param_counts()
    parts = counts["components"]
    decoder = parts["tok_emb"] + parts["pos_emb"] + parts["blocks"] + parts["ln_f"]
    return {"vision_params": parts["vis_enc"], "decoder_params": decoder, "params_unique": counts["params_unique"]}


def run_sweep(grid_file: str | Path, out_dir: str | Path, log: str | None = None) -> list[dict[str, Any]]:
    spec = load_grid(grid_file)
    out = Path(out_dir)
    base = get_preset(spec.get("preset", "supravl-nano"))
    tc = TrainConfig(**(spec.get("train") or {}))
    rows = []
    for name, overrides in grid_runs(spec):
        cfg = base.with_overrides(overrides)
        run_dir = _run_dir(out, name)
        print(f"sweep: {name}")
        summary = train(cfg, tc, run_dir, data_dir=spec.get("data"), progress_bar=False)
        rows.append({"run": name, **overrides, **_component_params(SupraVL(cfg)),
                     "final_val_loss": round(summary["last_val_loss"], 4),
                     "best_val_loss": round(summary["best_val_loss"], 4),
                     "tokens_per_s": round(summary["tokens_per_s"], 1),
                     "train_time_s": round(summary["wall_time_s"], 1)})
        if log:
            log_run(log, out / log / name, run_dir / "metrics.jsonl")
    write_tables(rows, out)
    plot_sweep(rows, out)
    return rows


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    columns = list(rows[0])
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) and not isinstance(r[c], bool) else str(r[c])
                                for c in columns) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        metrics = (_run_dir(out, row["run"]) / "metrics.jsonl").read_text().splitlines()
        val = [(r["step"], r["val_loss"]) for r in map(json.loads, metrics) if "val_loss" in r]
        ax.plot(*zip(*val), "o-", label=row["run"], markersize=3)
    ax.set(xlabel="optimiser step", ylabel="validation loss", title="validation loss by run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row["params_unique"], row["tokens_per_s"])
        ax.annotate(row["run"], (row["params_unique"], row["tokens_per_s"]), fontsize=7)
    ax.set(xlabel="parameters (unique)", ylabel="training text tokens / s", title="throughput vs size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s_vs_params.png", dpi=100)
    plt.close(fig)


def log_run(kind: str, log_dir: Path, metrics_path: Path) -> None:
    """Write a run's metrics.jsonl as TensorBoard scalars."""
    if kind != "tensorboard":
        raise UserError(f"unknown logger {kind!r}; supported: tensorboard")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
    with SummaryWriter(str(log_dir)) as writer:
        for row in map(json.loads, metrics_path.read_text().splitlines()):
            for key in ("train_loss", "val_loss", "lr", "samples_per_s"):
                if key in row:
                    writer.add_scalar(key, row[key], row["step"])
