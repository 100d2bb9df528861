"""Peak memory of one training step and of generation, per batch size, for any preset.

Random weights and random token ids: this measures memory, not quality. Per batch size B:

    training step   `steps` optimiser steps (default 2): forward (autocast in bf16) + backward
                    + clip + AdamW. The second step is the steady state: AdamW's moments exist
                    (allocated during step 1) while step 2's activations and gradients are alive.
    generation      greedy decoding of `new_tokens` tokens with the KV cache, every row running
                    the full length (the end-of-sequence token is switched off).

Inputs per family:

    supravl   images (B, 3, img_size, img_size) + `text_tokens` text tokens (default
              lm_max_text_len, the whole training context); generation starts from <bos> after
              the visual tokens
    nanovlm   one image per sample (B, 3, vit_img_size, vit_img_size) as tokens_per_image
              image tokens, then `text_tokens` text tokens (default 32) as the prompt

How peaks are read:

    cpu    the peak RSS (ru_maxrss) of a fresh process per (batch size, phase):
           `python -m picovlm.memory --one JSON`. Once the model is built, the kernel's peak is
           reset to the RSS of that moment (/proc/self/clear_refs), so the transient memory of
           building the model (initialisation, the untied head before tying) does not hide a
           smaller step. The baseline is that RSS (Python + torch + weights) in a process that
           runs nothing, so the table also shows what the step adds.
    cuda   torch.cuda.max_memory_allocated() in the same fresh processes: tensors only, not the
           CUDA context. The baseline is the weights on the GPU.

Precision: fp32, or bf16 = autocast for the training step (weights, gradients and AdamW
moments stay float32, as in picovlm.train) and bf16 weights (and KV cache) for generation.
An out-of-memory batch size is recorded as "OOM" and larger ones are not tried for that phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from picovlm.config import TrainConfig, VLMConfig
from picovlm.errors import UserError

PHASES = ("train", "generate")
OOM = "OOM"
NANOVLM_TEXT_TOKENS = 32


def measure_memory(cfg: VLMConfig, batch_sizes: Sequence[int], device: str = "cpu", precision: str = "fp32",
                   text_tokens: int | None = None, new_tokens: int = 16, steps: int = 2,
                   phases: Sequence[str] = PHASES, progress: bool = True) -> dict[str, Any]:
    """Peaks (MiB) per batch size and phase, each from a fresh process; see the module docstring."""
    cfg.validate()
    _check_settings(batch_sizes, device, precision, phases, steps)
    if cfg.family == "supravl" and text_tokens is not None and not 0 < text_tokens <= cfg.lm_max_text_len:
        raise UserError(f"supravl models read at most lm_max_text_len={cfg.lm_max_text_len} text tokens, "
                        f"not {text_tokens}")
    job = {"config": cfg.to_dict(), "device": device, "precision": precision, "steps": steps,
           "text_tokens": text_tokens or _default_text_tokens(cfg), "new_tokens": new_tokens}
    bar = tqdm(total=len(batch_sizes) * len(phases) + len(phases), desc="measuring memory", unit="process",
               disable=not progress)
    baseline: dict[str, float | str] = {}
    for phase in phases:
        if phase == "generate" and precision == "fp32" and "train" in baseline:
            baseline[phase] = baseline["train"]  # the same process: fp32 weights, nothing run
        else:
            baseline[phase] = _spawn({**job, "phase": phase, "weights_only": True, "batch_size": 1})
        if baseline[phase] == OOM:
            raise UserError(f"the model's weights alone do not fit in memory on {device}")
        bar.update()
    rows = [{"batch_size": b, **{f"{p}_peak_mib": None for p in phases}} for b in batch_sizes]
    for phase in phases:
        for row in rows:
            row[f"{phase}_peak_mib"] = _spawn({**job, "phase": phase, "weights_only": False,
                                               "batch_size": row["batch_size"]})
            bar.update()
            if row[f"{phase}_peak_mib"] == OOM:
                break  # larger batches would not fit either; they stay None (not tried)
    bar.close()
    return {"family": cfg.family, "device": device, "precision": precision, "steps": steps,
            "text_tokens": job["text_tokens"], "new_tokens": new_tokens, "unit": "MiB",
            "measure": "torch.cuda.max_memory_allocated" if device.startswith("cuda") else
            "peak RSS (ru_maxrss) of a fresh process, from the model built on",
            "params": sum(p.numel() for p in _meta_model(cfg).parameters()),
            "baseline_mib": baseline, "rows": rows}


def _check_settings(batch_sizes: Sequence[int], device: str, precision: str, phases: Sequence[str],
                    steps: int) -> None:
    if not batch_sizes or any(b <= 0 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if precision not in ("fp32", "bf16"):
        raise UserError(f"unknown precision {precision!r}; choose fp32 or bf16")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"measure-memory runs on cpu or cuda, not {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
    unknown = [p for p in phases if p not in PHASES]
    if unknown or steps < 1:
        raise UserError(f"phases must be among {', '.join(PHASES)} and steps >= 1")


def _default_text_tokens(cfg: VLMConfig) -> int:
    return NANOVLM_TEXT_TOKENS if cfg.family == "nanovlm" else cfg.lm_max_text_len


def _meta_model(cfg: VLMConfig) -> torch.nn.Module:
    from picovlm.models import build_model

    with torch.device("meta"):  # shapes only, for the parameter count
        return build_model(cfg)


# Linux carries a process's peak RSS over from the process it was forked from (the copied memory
# counts) and keeps it across exec, so a child forked from this process, which holds torch, would
# report at least this process's RSS. A small launcher forks the measured process instead; its
# signal (an out-of-memory kill) is passed on as its own.
_LAUNCHER = ("import os, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "os.kill(os.getpid(), -rc) if rc < 0 else sys.exit(rc)")


def _spawn(job: dict[str, Any]) -> float | str:
    """Run one measurement in a fresh interpreter; its peak, or OOM."""
    env = dict(os.environ)
    # The child must import this same picovlm, wherever the parent found it.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    child = [sys.executable, "-m", "picovlm.memory", "--one", json.dumps(job)]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *child], capture_output=True, text=True, env=env)
    if proc.returncode == -9:  # SIGKILL: the kernel's out-of-memory killer
        return OOM
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"memory measurement {job['phase']} at batch size {job['batch_size']} failed: {tail[0]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return OOM if result.get("oom") else result["peak_mib"]


# --- inside the child process -------------------------------------------------


def measure_one(job: dict[str, Any]) -> float:
    """Build the model, run one phase at one batch size, return this process's peak in MiB."""
    import picovlm.generate
    import picovlm.train  # noqa: F401 - imported in every process, so the baseline holds all the code
    from picovlm.models import build_model

    cfg = VLMConfig.from_dict(job["config"])
    device, phase, B = job["device"], job["phase"], job["batch_size"]
    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    bf16_weights = phase == "generate" and job["precision"] == "bf16"
    # Built in bf16 directly: an fp32 copy first would set the process's peak RSS by itself.
    torch.set_default_dtype(torch.bfloat16 if bf16_weights else torch.float32)
    model = build_model(cfg).to(device)
    torch.set_default_dtype(torch.float32)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak restarts at what is allocated now: the weights
    else:
        gc.collect()
        reset_peak_rss()
    if not job["weights_only"]:
        inputs = _random_inputs(cfg, B, job["text_tokens"], device)
        if phase == "train":
            _train_steps(model, inputs, job["precision"], device, job["steps"])
        else:
            _generate(model, inputs, job["new_tokens"])
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> None:
    """Linux: the peak RSS (VmHWM, and so ru_maxrss) restarts at the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak RSS ({e}); measure-memory on CPU needs Linux 4.0+") from None


def _random_inputs(cfg: VLMConfig, B: int, text_tokens: int, device: str) -> dict[str, torch.Tensor]:
    """Images and token ids of the right shapes; ids avoid the image token, so only real
    placeholders are replaced."""
    if cfg.family == "nanovlm":
        size, n_image_tokens = cfg.vit_img_size, (cfg.vit_img_size // cfg.vit_patch_size
                                                  // cfg.mp_pixel_shuffle_factor) ** 2
        text = torch.randint(0, cfg.lm_vocab_size, (B, text_tokens))
        ids = torch.cat([torch.full((B, n_image_tokens), cfg.lm_vocab_size), text], dim=1)  # image tokens first
    else:
        size, ids = cfg.img_size, torch.randint(0, cfg.lm_vocab_size, (B, text_tokens))
    return {"images": torch.randn(B, 3, size, size, device=device), "input_ids": ids.to(device)}


def _loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from picovlm.models.supravl import IGNORE_INDEX

    images, ids = inputs["images"], inputs["input_ids"]
    if model.cfg.family == "nanovlm":
        labels = ids.masked_fill(ids == model.cfg.lm_vocab_size, IGNORE_INDEX)  # no loss on image tokens
        return model(ids, images, None, labels, loss_only=True)[1]
    return model(images, ids, ids, loss_only=True)[1]  # random targets: every text position has one


def _train_steps(model: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: str, device: str,
                 steps: int) -> None:
    """picovlm.train's step: its optimiser and its autocast (which also picks the attention kernel)."""
    from picovlm.train import autocast_context, configure_optimizer

    tc = TrainConfig()
    model.train()
    optimizer = configure_optimizer(model, tc, device)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(precision, device):
            loss = _loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()


def _generate(model: torch.nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> None:
    from picovlm.generate import GenerationConfig, generate

    model.cfg.eos_token_id = -1  # random weights may end early; every row generates all new tokens
    gen = GenerationConfig(strategy="greedy", max_new_tokens=new_tokens)
    images = inputs["images"].to(next(model.parameters()).dtype)
    if model.cfg.family == "nanovlm":
        model.generate(inputs["input_ids"], images, None, gen)
    else:
        generate(model, images, gen)


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


# --- the report ----------------------------------------------------------------


def format_table(report: dict[str, Any], title: str = "") -> str:
    """A Markdown table: batch size | training step peak | generation peak, each with what it adds
    to the baseline of the model's weights."""
    base = report["baseline_mib"]
    lines = [f"{title or report['family']}: {report['measure']}, {report['device']}, {report['precision']}, "
             f"{report['params']:,} parameters"]
    lines.append("baseline (model built, nothing run): " + ", ".join(f"{p} {base[p]:.0f} MiB" for p in base))
    names = {"train": "training step peak", "generate": "generation peak"}
    phases = [p for p in PHASES if p in base]
    lines += ["", "| batch size | " + " | ".join(names[p] for p in phases) + " |",
              "|---:|" + "---:|" * len(phases)]
    for row in report["rows"]:
        cells = [_cell(row[f"{p}_peak_mib"], base[p]) for p in phases]
        lines.append(f"| {row['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(peak: float | str | None, base: float) -> str:
    if peak is None:
        return "not tried"
    if peak == OOM:
        return OOM
    return f"{peak:,.0f} MiB (+{peak - base:,.0f})"


def parse_batch_sizes(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes expects comma-separated integers like 1,2,4, got {text!r}") from None
    if not sizes or any(b <= 0 for b in sizes):
        raise UserError(f"--batch-sizes expects positive integers, got {text!r}")
    return sizes


def _child_main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="one measurement (used by picovlm measure-memory)")
    p.add_argument("--one", required=True, help="the job, as JSON")
    job = json.loads(p.parse_args(argv).one)
    try:
        result: dict[str, Any] = {"peak_mib": measure_one(job)}
    except Exception as e:  # noqa: BLE001 - only running out of memory is a result; the rest re-raises
        if not _is_oom(e):
            raise
        result = {"oom": True}
    print(json.dumps(result))


if __name__ == "__main__":
    _child_main()
