"""The training loop: read it top to bottom like the algorithm.

    prepare data (picovlm.data.prepare) -> build or resume model and optimiser -> for each epoch:
        for each batch: lr for this step, forward (autocast), backward, clip, step
        validate, save `last/` (with optimiser/RNG state) and `best/`, plot the losses

Everything a run writes goes to `out/`: `best/` and `last/` checkpoint folders (Hub
format), `metrics.jsonl` (one JSON object per log line), `loss.png`, `train_config.json`.
`last/` also holds `training_state.safetensors` + `training_state.json`, so `--resume`
continues exactly where the run stopped: same weights, optimiser moments, schedule
position, batch order and random state.
"""

from __future__ import annotations

import io
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from picovlm.chat import ChatBatch
from picovlm.checkpoint import WEIGHTS, from_pretrained, save_pretrained
from picovlm.config import SELECT_ON, TrainConfig, VLMConfig
from picovlm.data.batches import AUGMENT_DRAWS, Batch, CaptionBatches, augment
from picovlm.data.images import normalize
from picovlm.data.prepare import prepare_data, prepare_vqa_data, uses_feature_cache
from picovlm.data.stream import StreamBatches, is_stream
from picovlm.distributed import (
    SINGLE_PROCESS,
    DistInfo,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from picovlm.errors import UserError
from picovlm.generate import GenerationConfig
from picovlm.io import find_complete_dir
from picovlm.models import build_model
from picovlm.models.nanovlm import NanoVLM
from picovlm.models.supravl import IGNORE_INDEX, SupraVL

STATE_TENSORS, STATE_JSON = "training_state.safetensors", "training_state.json"


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# --- learning rate and precision -------------------------------------------


def get_lr(step: int, total_steps: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then cosine decay to tc.min_lr at total_steps."""
    warmup = min(tc.warmup_steps, max(total_steps // 10, 1))
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), read from Linux's
    /proc/cpuinfo. There bf16 autocast trains supravl-nano 1.1-1.2x faster than fp32
    (benchmarks/train_precision.py); without them bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """auto: on CUDA bf16 where supported, else fp16 with a GradScaler; on CPU bf16 autocast
    where the CPU has bf16 instructions, else fp32; fp32 on MPS."""
    if precision == "auto":
        if device.startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise UserError("fp16 training needs a CUDA GPU; use --precision bf16 or fp32")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    return precision


@contextmanager
def autocast_context(precision: str, device: str) -> Iterator[None]:
    """Mixed precision for the forward pass (fp32: nothing changes)."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype), \
            _cpu_bf16_attention(precision, device):
        yield


def _cpu_bf16_attention(precision: str, device: str) -> Any:
    """On CPU in bf16, attention as plain matmuls + softmax: PyTorch's CPU flash-attention kernel
    spends ~45% of a supravl-nano training step in its bf16 backward at these tiny head sizes, and
    the math path trains 1.4x faster (benchmarks/train_throughput.py)."""
    if device == "cpu" and precision == "bf16":
        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


def to_channels_last(model: SupraVL) -> SupraVL:
    """Convolutions in NHWC memory order (images follow in `to_device`): the CNN trains ~1.1-1.3x
    faster on CPU with oneDNN, and it is the layout tensor cores want on GPU."""
    model.vis_enc.to(memory_format=torch.channels_last)
    return model


class StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop after the current step (so the saved state is whole);
    a second one stops at once. Only installed in the main thread, where signals arrive."""

    def __init__(self) -> None:
        self.requested = False  # finish the step, save, stop
        self.forced = False  # stop now, save nothing
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl-C again to stop at once)", file=sys.stderr)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def error(self, out: Path, save_last: Callable[[], None], where: str) -> UserError:
        """The one-line error that ends an interrupted run in `out`. After a first Ctrl-C the step
        has finished: save_last() saves it and the user is told how to resume. After a second one,
        or a KeyboardInterrupt from elsewhere, a step may be half done, so nothing is saved."""
        if self.forced or not self.requested:
            return UserError(f"stopped at once; {out / 'last'} holds the last checkpoint; continue from it with "
                             f"the same command plus --resume")
        save_last()
        return UserError(f"interrupted after {where}; progress saved in {out / 'last'}; "
                         f"continue with the same command plus --resume")


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
               batch: tuple[torch.Tensor, ...], tc: TrainConfig, precision: str, device: str, step: int,
               grad_weight: float = 1.0) -> float:
    """One optimiser step on one batch (the model's forward arguments); returns its mean loss.
    grad_weight scales the loss before backward (see global_batch_step)."""
    return accumulate_step(model, optimizer, scaler, [(batch, grad_weight)], tc, precision, device, step)[0]


def accumulate_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    micro_batches: list[tuple[tuple[torch.Tensor, ...], float]], tc: TrainConfig, precision: str,
                    device: str, step: int) -> list[float]:
    """One optimiser step over micro-batches (gradient accumulation): for each, forward under
    autocast and backward of its mean loss times its weight (scaled for fp16); then clip, update.
    Returns each micro-batch's mean loss. Under DDP, gradients are averaged once, at the last."""
    optimizer.zero_grad(set_to_none=True)
    losses = []
    extra = {"word_loss": tc.word_loss} if tc.word_loss else {}
    for i, (tensors, weight) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()
        with out_of_memory_advice(tc.batch_size), no_sync:
            with autocast_context(precision, device):
                _, loss = model(*tensors, loss_only=True, label_smoothing=tc.label_smoothing, **extra)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at step {step}; lower the learning rate "
                                f"(--lr {tc.lr / 3:.1e}) or use --precision fp32, then start again")
            weighted = loss * weight if weight != 1.0 else loss
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        losses.append(loss.item())
    if scaler is not None:
        scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return losses


def global_batch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler | None, batch: Batch | ChatBatch, n_global: float,
                      cfg: VLMConfig, tc: TrainConfig, precision: str, device: str, step: int,
                      aug_rng: torch.Generator, dist_info: DistInfo, stop_requested: bool) -> tuple[float, bool]:
    """One optimiser step on a global batch; `batch` is this process's part, with n_global of the
    global batch's targets in all, run as tc.grad_accum_steps micro-batches.

    Returns the mean loss over all the global batch's targets, and whether any process was asked
    to stop (so that all stop after the same step)."""
    n = len(batch.input_ids)
    draws = torch.rand(n, AUGMENT_DRAWS, generator=aug_rng) if tc.augment and isinstance(batch, Batch) else None
    micro, shares = [], []
    for part in DistInfo(0, min(tc.grad_accum_steps, n)).all_rows(n):
        piece = batch.rows(part)
        share = int((piece.targets != IGNORE_INDEX).sum()) / n_global  # this piece's share of the targets
        # DDP averages gradients over processes: weighting each piece's mean loss by share * world
        # makes the sum the gradient of the mean over the whole batch, as in one process.
        tensors = to_device(piece, cfg, device, None if draws is None else draws[part], tc.augment_scale)
        if tc.word_loss:
            tensors = (*tensors, piece.words.to(device))
        micro.append((tensors, share * dist_info.world_size))
        shares.append(share)
    losses = accumulate_step(model, optimizer, scaler, micro, tc, precision, device, step)
    local = sum(loss * share for loss, share in zip(losses, shares))
    batch_loss, stop_votes = all_reduce_sum([local, float(stop_requested)], dist_info, device)
    return batch_loss, stop_votes > 0


@contextmanager
def out_of_memory_advice(batch_size: int) -> Iterator[None]:
    """Turn running out of (GPU or CPU) memory into advice to use a smaller batch."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text \
                and "out of memory" not in text:
            raise
        raise UserError(f"out of memory with batch size {batch_size}; try --batch-size {max(1, batch_size // 2)}"
                        ) from None


def configure_optimizer(model: torch.nn.Module, tc: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW with a learning rate per part (vision, projector, language: tc.lr_<part>, else tc.lr)
    and the parts in tc.freeze frozen; weight decay only on matrices, not on biases and norm gains.
    Each group keeps its peak rate as "base_lr"; the schedule scales all of them alike."""
    parts = model.parts() if hasattr(model, "parts") else {"language": list(model.parameters())}
    unknown = set(tc.freeze) - set(parts)
    if unknown:
        raise UserError(f"cannot freeze {sorted(unknown)}: the parts are {', '.join(parts)}")
    groups = []
    for name, params in parts.items():
        if name in tc.freeze:
            for p in params:
                p.requires_grad_(False)
        trainable = [p for p in params if p.requires_grad]  # a frozen backbone's are not
        part_lr = getattr(tc, f"lr_{name}", None)
        base_lr = tc.lr if part_lr is None else part_lr
        for decay, chosen in ((tc.weight_decay, [p for p in trainable if p.dim() >= 2]),
                              (0.0, [p for p in trainable if p.dim() < 2])):
            if chosen:
                groups.append({"params": chosen, "weight_decay": decay, "lr": base_lr, "base_lr": base_lr,
                               "part": name})
    if not groups:
        raise UserError("nothing to train: every part is frozen")
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, fused=device.startswith("cuda"))


# --- batches on the device ---------------------------------------------------


def process_batches(data: CaptionBatches | StreamBatches, batch_size: int, seed: int | None, start_batch: int,
                    dist_info: DistInfo) -> Iterator[Batch]:
    """This process's batches of one epoch. batch_size is global: in memory every process sees
    the same batch and keeps its rows; a stream gives each process its own samples."""
    if isinstance(data, StreamBatches):
        rows = dist_info.rows(batch_size)
        return data.epoch(rows.stop - rows.start, seed, start_batch)
    return (b.rows(dist_info.rows(len(b.input_ids))) for b in data.epoch(batch_size, seed, start_batch))


def to_device(batch: Batch | ChatBatch, cfg: VLMConfig, device: str, aug_draws: torch.Tensor | None = None,
              aug_scale: float = TrainConfig.augment_scale) -> tuple[torch.Tensor | None, ...]:
    """A batch as the model's forward arguments, on the device: uint8 images -> normalised floats
    (augmented if aug_draws are given, crops covering at least aug_scale of the area). SupraVL: (images,
    input_ids, targets); cached backbone features (batch.is_features) only become float32. NanoVLM:
    (input_ids, images (N, 3, S, S) of all samples in order, attention_mask, labels)."""
    if isinstance(batch, ChatBatch):
        images = torch.cat(batch.images) if batch.images else torch.zeros(0, 0, 0, 3, dtype=torch.uint8)
        pixels = normalize(images, cfg.img_mean, cfg.img_std).to(device) if len(images) else None
        return (batch.input_ids.to(device), pixels, batch.attention_mask.to(device), batch.labels.to(device))
    transform = (lambda x: augment(x, batch.flippable, aug_draws, aug_scale)) if aug_draws is not None else None
    images = images_to_device(batch.images, batch.is_features, cfg, device, transform)
    return images, batch.input_ids.to(device), batch.targets.to(device)


def images_to_device(images: torch.Tensor, is_features: bool, cfg: VLMConfig, device: str,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 (B, S, S, 3) pixels -> normalised (B, 3, S, S) floats (channels-last, see
    to_channels_last), transformed if asked; cached backbone features only become float32."""
    if is_features:
        return images.to(device).float()
    pixels = normalize(images, cfg.img_mean, cfg.img_std, transform)
    return pixels.to(device).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def evaluate_loss(model: SupraVL, data: CaptionBatches | StreamBatches, tc: TrainConfig, device: str,
                  precision: str, dist_info: DistInfo = SINGLE_PROCESS) -> float:
    """Mean token cross-entropy on a split (weighted by the number of target tokens).
    With several processes each scores its share and the sums are combined."""
    model.eval()
    total, n_tokens = 0.0, 0
    for i, batch in enumerate(process_batches(data, tc.batch_size, None, 0, dist_info)):
        if tc.eval_max_batches is not None and i >= tc.eval_max_batches:
            break
        with autocast_context(precision, device):
            _, loss = model(*to_device(batch, model.cfg, device))
        n = int((batch.targets != IGNORE_INDEX).sum())
        total, n_tokens = total + loss.item() * n, n_tokens + n
    model.train()
    total, n_tokens = all_reduce_sum([total, n_tokens], dist_info, device)
    return total / max(n_tokens, 1)


def validate(model: SupraVL, dev: CaptionBatches | StreamBatches, tc: TrainConfig, device: str, precision: str,
             dist_info: DistInfo = SINGLE_PROCESS) -> dict[str, float]:
    """The dev split's mean loss and, when best/ is selected on captions (tc.select_on "cider"), the
    CIDEr-D of its greedy captions. Every process captions the whole split, so all agree on best/."""
    scores = {"val_loss": evaluate_loss(model, dev, tc, device, precision, dist_info)}
    if tc.select_on == "cider":
        from picovlm.scst import dev_cider  # (scst builds on this module)

        scores["dev_cider"] = dev_cider(model, dev, device, precision)
    return scores


def check_feature_options(tc: TrainConfig, model: torch.nn.Module) -> None:
    """Mirrored and cropped features come from the feature cache: refuse them without it."""
    # (the flag at fault, the switch that turns it off)
    at_fault = [(flag, off) for flag, off, on in (("--mirror-features", "--no-mirror-features", tc.mirror_features),
                                                   ("--feature-crop", "--feature-crop 1", tc.feature_crop < 1)) if on]
    if at_fault and not uses_feature_cache(model, tc):
        flags, offs = " and ".join(f for f, _ in at_fault), ", ".join(o for _, o in at_fault)
        verb, it = ("needs", "it") if len(at_fault) == 1 else ("need", "them")
        raise UserError(f"{flags} {verb} a frozen MobileNetV2 whose features are cached: "
                        f"vision_type mobilenet_v2 without --augment (or turn {it} off: {offs})")


def check_selection(tc: TrainConfig, model: torch.nn.Module, data_dir: str | Path | None) -> None:
    """A one-line error for a best/ criterion that this run cannot compute, before any data is prepared:
    CIDEr-D needs a captioner and the in-memory dev split of a Flickr8k-layout folder (not a stream)."""
    if tc.select_on == "cider" and (not isinstance(model, SupraVL) or is_stream(data_dir)):
        raise UserError("--select-on cider captions the dev split of a Flickr8k-layout folder with a captioner; "
                        "this run has no such split (use --select-on loss)")


class WeightEMA:
    """An exponential moving average of the trained weights (Polyak averaging): after each step
    shadow = d * shadow + (1 - d) * weight, with d = min(decay, (1 + step) / (10 + step)) so that
    the first steps are not averaged with the random start. On a small dataset the average
    generalises better than the last step's weights; validation and best/ use it."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1 - d)
        self.steps += 1

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        params = dict(model.named_parameters())
        own = {name: params[name].detach().clone() for name in self.shadow}
        with torch.no_grad():
            for name, t in self.shadow.items():
                params[name].copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in own.items():
                    params[name].copy_(t)


def averaged(ema: WeightEMA | None, model: torch.nn.Module) -> Any:
    return ema.applied(model) if ema is not None else nullcontext()


# --- checkpoints with training state ---------------------------------------


def training_state_files(optimizer: torch.optim.Optimizer, progress: dict[str, Any],
                         aug_rng: torch.Generator, ema: WeightEMA | None = None) -> dict[str, bytes]:
    """Optimiser moments, RNG states and the weight average as safetensors; counters and param
    groups as JSON."""
    opt = optimizer.state_dict()
    tensors = {f"optim.{idx}.{name}": t.detach().cpu().contiguous()
               for idx, state in opt["state"].items() for name, t in state.items()}
    if ema is not None:
        tensors.update({f"ema.{name}": t.cpu().contiguous() for name, t in ema.shadow.items()})
        progress = {**progress, "ema_steps": ema.steps}
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.augment"] = aug_rng.get_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"progress": progress, "param_groups": opt["param_groups"]}
    return {STATE_TENSORS: save_safetensors_bytes(tensors), STATE_JSON: json.dumps(meta, indent=1).encode()}


def restore_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                           aug_rng: torch.Generator, ema: WeightEMA | None = None) -> dict[str, Any]:
    try:
        tensors = load_safetensors_bytes((folder / STATE_TENSORS).read_bytes())
        meta = json.loads((folder / STATE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot resume from {folder}: training state unreadable ({e}); "
                        f"start a new run in another --out folder") from None
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    aug_rng.set_state(tensors["rng.augment"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    ema_steps = meta["progress"].pop("ema_steps", None)
    if ema is not None:
        if ema_steps is None:
            raise UserError(f"{folder} was saved without a weight average: resume without --ema, or start a "
                            f"new run in another --out folder")
        for name, t in ema.shadow.items():
            t.copy_(tensors[f"ema.{name}"])
        ema.steps = ema_steps
    return meta["progress"]


# --- plotting and logging --------------------------------------------------


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    cider = [(r["step"], r["dev_cider"]) for r in rows if "dev_cider" in r]  # with --select-on cider
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (logged batches)", alpha=0.7)
    if val:
        ax.plot(*zip(*val), "o-", label="validation (dev split)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy per token")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    if cider:
        ax_cider = ax.twinx()
        ax_cider.plot(*zip(*cider), "s--", color="tab:green", label="dev CIDEr-D, greedy (selects best/)")
        ax_cider.set_ylabel("CIDEr-D")
        ax_cider.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


# --- the loop --------------------------------------------------------------


def train(cfg: VLMConfig, tc: TrainConfig, out_dir: str | Path, data_dir: str | Path | None = None,
          resume: bool = False, device: str | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Train a model; returns a summary (final losses, time, samples/s, checkpoint paths).

    Under torchrun, every process runs this; see picovlm.distributed."""
    out = Path(out_dir)
    dist_info, device = init_distributed(device or autodetect_device())
    if tc.scst_epochs and dist_info.enabled:
        cleanup(dist_info)
        raise UserError("SCST runs in one process: train with --scst-epochs 0 under torchrun, then run "
                        f"picovlm scst --model {out / 'best'} --data {data_dir} --out {out / 'scst'}")
    try:
        summary = _train(cfg, tc, out, data_dir, resume, device, progress_bar and dist_info.is_main, dist_info)
        barrier(dist_info)  # rank 0 may still be writing checkpoints: tear the group down together
    finally:
        cleanup(dist_info)
    if tc.scst_epochs:  # second stage: fine-tune the best cross-entropy model on CIDEr-D
        from picovlm.scst import self_critical  # (scst builds on this module)

        scst_last = find_complete_dir(out / "scst" / "last")
        summary["scst"] = self_critical(out / "best", data_dir, out / "scst", tc, resume=resume and scst_last.exists(),
                                        device=device, progress_bar=progress_bar)
        summary["best"] = summary["scst"]["best"]
    if tc.generation.get("mbr_neighbours") and dist_info.is_main:
        # The stored decoding reads an index of the training captions (picovlm.neighbours): build
        # one for each checkpoint, whose own weights compute its features.
        from picovlm.neighbours import add_index

        data_path = json.loads((out / "train_config.json").read_text())["data"]
        for folder in dict.fromkeys((summary["best"], summary["last"])):
            add_index(folder, data_path)
    return summary


def _train(cfg: VLMConfig, tc: TrainConfig, out: Path, data_dir: str | Path | None, resume: bool, device: str,
           progress_bar: bool, dist_info: DistInfo) -> dict[str, Any]:
    if tc.batch_size < dist_info.world_size:
        raise UserError(f"batch size {tc.batch_size} is smaller than the {dist_info.world_size} processes; "
                        f"the batch size is global: use --batch-size {dist_info.world_size} or more")
    if tc.select_on not in SELECT_ON:
        raise UserError(f"unknown selection {tc.select_on!r}: best/ is selected on one of {', '.join(SELECT_ON)}")
    for flag, crop_of, share in (("--feature-crop", "a feature map", tc.feature_crop),
                                 ("--augment-scale", "an image", tc.augment_scale)):
        if not 0 < share <= 1:
            raise UserError(f"{flag} is the smallest share of {crop_of} a crop covers, in (0, 1]; got {share}")
    if tc.augment_scale != TrainConfig.augment_scale and not tc.augment:
        raise UserError("--augment-scale sets the crops of --augment: add --augment, or drop --augment-scale")
    if tc.word_loss < 0:
        raise UserError(f"--word-loss is a weight, 0 or more; got {tc.word_loss}")
    if tc.generation and cfg.family == "nanovlm":
        raise UserError("a stored decoding (the train config's generation) is for captioners; drop it for a NanoVLM")
    GenerationConfig.from_dict(tc.generation, "the train config's generation settings")
    if tc.generation.get("mbr_neighbours") and is_stream(data_dir):
        raise UserError("a stored --mbr-neighbours decoding needs an index of the training captions, built "
                        "from a caption folder; drop it from the decoding for streamed data")
    if tc.word_loss and (cfg.family == "nanovlm" or is_stream(data_dir)):
        raise UserError("--word-loss needs a captioner trained on a caption folder (each image's reference "
                        "captions in memory); drop it for this model or data")
    main = dist_info.is_main  # only the first process writes files
    precision = resolve_precision(tc.precision, device)
    torch.manual_seed(tc.seed)

    last_dir = find_complete_dir(out / "last")
    if resume and not (last_dir / STATE_JSON).is_file():
        raise UserError(f"nothing to resume in {out}: no {out / 'last' / STATE_JSON}; drop --resume to start")
    if not resume and (last_dir / WEIGHTS).is_file():
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")

    if resume:
        model = from_pretrained(last_dir, device=device)
        cfg = model.cfg
    else:
        model = build_model(cfg)
        # Pretrained parts before the data, so that missing weights fail at once. A pretrained
        # language model brings its tokenizer.
        if isinstance(model, NanoVLM):
            model.tokenizer = model.load_pretrained_parts()
        else:
            model.load_pretrained_vision()
        model = model.to(device)
    check_selection(tc, model, data_dir)
    if isinstance(model, NanoVLM):
        data = prepare_vqa_data(data_dir, model, dist_info, device)
    else:  # a new SupraVL has no tokenizer yet: it is trained here
        check_feature_options(tc, model)
        data = prepare_data(data_dir, cfg, model.tokenizer, dist_info, device, tc.num_workers,
                            model.vis_enc if uses_feature_cache(model, tc) else None, progress_bar,
                            tc.mirror_features, tc.feature_crop)
        to_channels_last(model)
        if tc.word_loss:
            data.train.serve_words()
    data_path = data.path
    model.tokenizer = data.tokenizer
    if isinstance(model, SupraVL):  # saved with every checkpoint below (generation_config.json)
        model.generation = dict(tc.generation)
    model.train()
    ddp_model = wrap_model(model, dist_info, device)  # the model itself in one process
    if tc.compile:  # opt-in: the first steps pay for compilation (benchmarks/train_throughput.py --compile)
        ddp_model = torch.compile(ddp_model)

    optimizer = configure_optimizer(model, tc, device)
    ema = WeightEMA(model, tc.ema_decay) if tc.ema_decay else None  # after freezing: trained weights only
    aug_rng = torch.Generator().manual_seed(tc.seed + 1)
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_val": float("inf"), "elapsed_s": 0.0}
    if resume:
        progress = restore_training_state(last_dir, optimizer, aug_rng, ema)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    batches_per_epoch = data.train.n_batches(tc.batch_size)  # None for a stream
    if batches_per_epoch is None and tc.max_steps is None:
        raise UserError(f"{data.path} is streamed and has no length; give the number of steps with --max-steps")
    total_steps = tc.max_steps if batches_per_epoch is None else tc.epochs * batches_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    n_epochs = tc.epochs if batches_per_epoch is not None else sys.maxsize  # a stream: until max_steps
    metrics_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": tc.to_dict(),
                                                           "data": str(data_path), "device": device,
                                                           "precision": precision,
                                                           "processes": dist_info.world_size}, indent=2))
    log = metrics_path.open("a") if main else io.StringIO()  # other processes log nowhere

    step, samples, tokens, t_start = progress["step"], 0, 0, time.perf_counter()
    scores: dict[str, float] = {}  # the latest validation
    elapsed_before = progress["elapsed_s"]
    last_train_loss = float("nan")

    def save(best: bool) -> None:
        progress.update(step=step, elapsed_s=elapsed_before + time.perf_counter() - t_start)
        if not main:
            return
        dev = data.dev.describe() if data.dev is not None else "no dev split"
        metrics = {"training data": f"{Path(data_path).name} ({data.train.describe()} train / {dev})",
                   "step": step, "epochs": tc.epochs, "batch size": tc.batch_size,
                   "train_loss": round(last_train_loss, 4), "best_val_loss": round(progress["best_val"], 4),
                   **{name: round(value, 4) for name, value in scores.items()}}  # the latest validation
        save_pretrained(model, out / "last", metrics, training_state_files(optimizer, progress, aug_rng, ema))
        if best:
            with averaged(ema, model):
                save_pretrained(model, out / "best", metrics)

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress_bar,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)  # fewer lines in log files
    stop = StopOnInterrupt()
    try:
        for epoch in range(progress["epoch"], n_epochs):
            if step >= total_steps:
                break
            t_epoch, epoch_samples, data_ended = time.perf_counter(), 0, False
            batches = process_batches(data.train, tc.batch_size, tc.seed * 1000 + epoch, progress["batch"], dist_info)
            while step < total_steps:
                batch = next(batches, None)
                n_local = 0 if batch is None else int((batch.targets != IGNORE_INDEX).sum())
                n = 0 if batch is None else len(batch.input_ids)
                # The global batch's targets and samples, and whether any process has run out of data.
                n_targets, n_samples, n_ended = all_reduce_sum([n_local, n, float(batch is None)], dist_info, device)
                if n_ended:
                    data_ended = True
                    break
                lr = get_lr(step, total_steps, tc)
                for group in optimizer.param_groups:  # each part keeps its own peak rate
                    group["lr"] = lr * group.get("base_lr", tc.lr) / tc.lr
                last_train_loss, stop_now = global_batch_step(
                    ddp_model, optimizer, scaler, batch, n_targets, cfg, tc, precision, device, step, aug_rng,
                    dist_info, stop.requested)
                if ema is not None:
                    ema.update(model)
                step += 1
                progress["batch"] += 1
                samples, epoch_samples = samples + int(n_samples), epoch_samples + int(n_samples)
                tokens += int(n_targets)  # text tokens that carried loss
                rate = epoch_samples / (time.perf_counter() - t_epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{last_train_loss:.3f}", samples_s=f"{rate:.0f}", epoch=epoch + 1, refresh=False)
                if tc.save_every and step % tc.save_every == 0 and progress["batch"] != batches_per_epoch:
                    save(best=False)
                if step % tc.log_every == 0 or step == total_steps:
                    log.write(json.dumps({"step": step, "epoch": epoch + 1, "train_loss": last_train_loss,
                                          "lr": lr, "samples_per_s": rate}) + "\n")
                    log.flush()
                if stop_now:
                    stop.requested = True
                    raise KeyboardInterrupt
            epoch_done = data_ended or progress["batch"] == batches_per_epoch
            if data.dev is not None:
                with averaged(ema, model):
                    scores = validate(model, data.dev, tc, device, precision, dist_info)
                val_loss = scores["val_loss"]
                best = (scores["dev_cider"] > progress.get("best_cider", -math.inf) if tc.select_on == "cider"
                        else val_loss < progress["best_val"])
                progress["best_val"] = min(val_loss, progress["best_val"])
                if "dev_cider" in scores:
                    progress["best_cider"] = max(scores["dev_cider"], progress.get("best_cider", -math.inf))
            else:  # nothing to select on: the latest weights are the best we know
                val_loss, scores, best = float("nan"), {}, True
            log.write(json.dumps({"step": step, "epoch": epoch + 1, "val_loss": val_loss, **scores,
                                  "epoch_time_s": time.perf_counter() - t_epoch}) + "\n")
            log.flush()
            cider_text = f", dev CIDEr-D {scores['dev_cider']:.4f}" if "dev_cider" in scores else ""
            bar.write(f"epoch {epoch + 1}: train loss {last_train_loss:.4f}, val loss {val_loss:.4f}{cider_text}",
                      file=sys.stderr)
            if epoch_done:
                progress.update(epoch=epoch + 1, batch=0)
            save(best)
            if main:
                plot_losses(metrics_path, out / "loss.png")
    except KeyboardInterrupt:
        bar.close()
        raise stop.error(out, lambda: save(best=False), f"step {step}") from None
    finally:
        stop.restore()
        bar.close()
        log.close()
    elapsed = time.perf_counter() - t_start
    return {
        "steps": step,
        "train_loss": last_train_loss,
        "best_val_loss": progress["best_val"],
        "last_val_loss": scores.get("val_loss", float("nan")),
        **({"best_dev_cider": progress["best_cider"]} if "best_cider" in progress else {}),
        "wall_time_s": elapsed,
        "total_time_s": elapsed_before + elapsed,
        "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "device": device,
        "precision": precision,
        "processes": dist_info.world_size,
        "best": str(out / "best"),
        "last": str(out / "last"),
    }
