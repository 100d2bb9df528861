"""Self-critical sequence training (Rennie et al. 2017): fine-tune a captioner on CIDEr-D itself.

Cross-entropy training teaches the model to predict the next word of a reference caption; at
test time it decodes its own words, and it is judged by CIDEr, BLEU and METEOR. SCST closes that
gap with REINFORCE: the model samples captions, each is rewarded by its CIDEr-D against the
image's references, and the samples that beat their siblings are made more likely.

    for each batch of B images (cached backbone features or pixels):
        sample K captions per image, no gradient, KV cache     (B*K, T) tokens
        r[i, k] = CIDEr-D(caption ik, references of image i)     (B, K)
        a[i, k] = r[i, k] - mean of the other K - 1 rewards of image i   (Luo 2020's baseline)
        loss = -sum a[i, k] * log p(caption ik | image i) / number of sampled tokens

The baseline needs no greedy decode (the "new SCST" of Luo, arXiv:2003.09971): a sample is
pushed up only if it is better than the other samples of the same image. CIDEr-D's document
frequencies come from the training references, as in the original.

After each epoch the dev split is captioned greedily and scored with CIDEr-D (document
frequencies from the dev references, as pycocoevalcap does); `best/` keeps the highest.
The run writes `best/`, `last/` (with training state, so `--resume` continues exactly) and
`metrics.jsonl`, like `picovlm train`.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from picovlm.checkpoint import from_pretrained, save_pretrained
from picovlm.config import TrainConfig
from picovlm.data.batches import CaptionBatches, pad_rows
from picovlm.data.prepare import prepare_data, uses_feature_cache
from picovlm.errors import UserError
from picovlm.generate import GenerationConfig, generate, generate_from_visual
from picovlm.io import find_complete_dir
from picovlm.models.supravl import IGNORE_INDEX, SupraVL
from picovlm.train import (
    STATE_JSON,
    StopOnInterrupt,
    autocast_context,
    autodetect_device,
    configure_optimizer,
    get_lr,
    images_to_device,
    resolve_precision,
    restore_training_state,
    training_state_files,
)

NGRAMS = 4  # CIDEr uses 1- to 4-grams
SIGMA = 6.0  # CIDEr-D's length penalty: exp(-(len(candidate) - len(reference))^2 / (2 sigma^2))
# The tokens pycocoevalcap's PTB tokenizer leaves once it drops punctuation, so that the reward
# counts the n-grams the evaluation counts: hyphenated words stay whole ("t-shirt"), clitics split
# off ("man 's", "do n't"), brackets become -lrb- / -rrb-.
_TOKEN = re.compile(r"[a-z0-9]+(?=n't)|n't|'[a-z]+|[a-z0-9]+(?:[-.][a-z0-9]+)*|[()]")
_BRACKETS = {"(": "-lrb-", ")": "-rrb-"}


def words(caption: str) -> list[str]:
    """Lower-case tokens without punctuation, as the PTB tokenizer of the evaluation makes them."""
    return [_BRACKETS.get(t, t) for t in _TOKEN.findall(caption.lower())]


def _ngram_counts(tokens: list[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, NGRAMS + 1) for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) as coco-caption computes it, with document frequencies fixed
    by a reference corpus: `references[i]` lists the reference captions of image i.

    An n-gram's weight is tf * (log N_images - log df); a candidate and each reference become
    one tf-idf vector per n; the score is the mean over references and n of the clipped cosine
    similarity times the length penalty, times 10."""

    def __init__(self, references: Sequence[Sequence[str]]):
        df: Counter = Counter()
        for refs in references:
            df.update({g for ref in refs for g in _ngram_counts(words(ref))})
        self.df = df
        self.log_n_docs = math.log(float(len(references)))

    def _vector(self, counts: Counter) -> tuple[list[dict], np.ndarray]:
        vec: list[dict] = [{} for _ in range(NGRAMS)]
        norms = np.zeros(NGRAMS)
        for gram, tf in counts.items():
            n = len(gram) - 1
            weight = tf * (self.log_n_docs - math.log(max(1.0, self.df[gram])))
            vec[n][gram] = weight
            norms[n] += weight * weight
        return vec, np.sqrt(norms)

    def prepare(self, refs: Sequence[str]) -> list[tuple[list[dict], np.ndarray, int]]:
        """References -> their vectors, norms and lengths (compute once per image, score many times)."""
        out = []
        for ref in refs:
            tokens = words(ref)
            out.append((*self._vector(_ngram_counts(tokens)), len(tokens)))
        return out

    def score(self, candidate: str, prepared_refs: Sequence[tuple[list[dict], np.ndarray, int]]) -> float:
        tokens = words(candidate)
        vec, norm = self._vector(_ngram_counts(tokens))
        total = np.zeros(NGRAMS)
        for ref_vec, ref_norm, ref_len in prepared_refs:
            penalty = math.exp(-((len(tokens) - ref_len) ** 2) / (2 * SIGMA**2))
            for n in range(NGRAMS):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] and ref_norm[n]:
                    total[n] += dot / (norm[n] * ref_norm[n]) * penalty
        return float(total.mean() / len(prepared_refs) * 10.0)


# --- one step --------------------------------------------------------------


def sequence_log_probs(model: SupraVL, visual: torch.Tensor, samples: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Teacher-force the sampled captions: visual (N, P, D), N token lists (no <bos>, no <eos>).

    Returns log p of each target token (M,) (the caption's words and its <eos>), and the row of each (M,)."""
    cfg = model.cfg
    limit = cfg.lm_max_text_len
    rows = [[cfg.bos_token_id, *ids, cfg.eos_token_id][:limit + 1] for ids in samples]
    tokens = pad_rows(rows, cfg.pad_token_id).to(visual.device)  # (N, t + 1)
    input_ids, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[tokens[:, 1:] == cfg.pad_token_id] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX  # (N, t)
    h = model.hidden_states(input_ids, visual)  # (N, t, D)
    logp = F.log_softmax(model.lm_head(h[keep]).float(), dim=-1)  # (M, V)
    row_of = torch.arange(len(rows), device=visual.device)[:, None].expand_as(keep)[keep]
    return logp.gather(1, targets[keep][:, None]).squeeze(1), row_of


def scst_step(model: SupraVL, optimizer: torch.optim.Optimizer, images: torch.Tensor,
              prepared_refs: list[list[tuple]], cider: CiderD, tc: TrainConfig, precision: str,
              device: str) -> dict[str, float]:
    """One SCST optimiser step on a batch of B images (pixels or features on the device)."""
    K = tc.scst_samples
    with autocast_context(precision, device):
        model.eval()  # sample from the model as it will caption: no dropout, BatchNorm's running statistics
        with torch.no_grad():  # each image is encoded once and its visual tokens repeated K times
            samples = generate_from_visual(model, model.encode_images(images).repeat_interleave(K, dim=0),
                                           GenerationConfig("sample"))
        model.train()
        texts = [model.tokenizer.decode(ids) for ids in samples]
        rewards = torch.tensor([cider.score(t, prepared_refs[i // K]) for i, t in enumerate(texts)]).view(-1, K)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / (K - 1)  # mean of the siblings
        advantage = (rewards - baseline).flatten().to(device)  # (B*K,)
        visual = model.encode_images(images).repeat_interleave(K, dim=0)  # (B*K, P, D)
        logp, row_of = sequence_log_probs(model, visual, samples)
        loss = -(advantage[row_of] * logp).sum() / len(logp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), "reward": rewards.mean().item(),
            "mean_words": float(np.mean([len(words(t)) for t in texts]))}


@torch.no_grad()
def dev_cider(model: SupraVL, data: CaptionBatches, device: str, precision: str, batch_images: int = 100) -> float:
    """Greedy captions of the dev split, CIDEr-D against its references (dev document frequencies)."""
    idx = torch.nonzero(data.ok).flatten()
    refs = [data.references[i] for i in idx.tolist()]
    cider = CiderD(refs)
    texts = []
    for start in range(0, len(idx), batch_images):
        images = images_to_device(data.images[idx[start:start + batch_images]], data.is_features, model.cfg, device)
        with autocast_context(precision, device):
            texts += [model.tokenizer.decode(ids) for ids in generate(model, images, GenerationConfig("greedy"))]
    model.train()
    return float(np.mean([cider.score(t, cider.prepare(r)) for t, r in zip(texts, refs)]))


# --- the loop --------------------------------------------------------------


def self_critical(init_dir: str | Path, data_dir: str | Path, out_dir: str | Path, tc: TrainConfig,
                  resume: bool = False, device: str | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Fine-tune the SupraVL checkpoint in init_dir with SCST for tc.scst_epochs epochs at peak
    rate tc.scst_lr (warm-up, then cosine decay), tc.scst_images images x tc.scst_samples samples
    per step, on the Flickr8k-layout folder data_dir. Writes out_dir/{best,last}; returns a summary."""
    out = Path(out_dir)
    device = device or autodetect_device()
    precision = resolve_precision(tc.precision, device)
    if tc.scst_samples < 2:
        raise UserError("SCST's baseline is the mean of the other samples of an image: use --scst-samples 2 or more")
    last_dir = find_complete_dir(out / "last")
    if resume and not (last_dir / STATE_JSON).is_file():
        raise UserError(f"nothing to resume in {out}: no {out / 'last' / STATE_JSON}; drop --resume to start")
    if not resume and last_dir.is_dir():
        raise UserError(f"{out} already holds an SCST run; pass --resume to continue it or choose another --out")
    model = from_pretrained(last_dir if resume else init_dir, device=device)
    if not isinstance(model, SupraVL):
        raise UserError("SCST fine-tunes captioners (the SupraVL family); a NanoVLM checkpoint was given")
    torch.manual_seed(tc.seed)
    data = prepare_data(data_dir, model.cfg, model.tokenizer, device=device,
                        frozen_encoder=model.vis_enc if uses_feature_cache(model, tc) else None,
                        progress=progress_bar)
    if not isinstance(data.train, CaptionBatches):
        raise UserError("SCST needs a Flickr8k-layout folder (every reference of an image at hand), not a stream")
    train_set = data.train
    cider = CiderD(train_set.references)
    train_idx = torch.nonzero(train_set.ok).flatten()

    scst_tc = TrainConfig(**{**tc.to_dict(), "lr": tc.scst_lr, "min_lr": tc.scst_lr / 10,
                             "warmup_steps": min(tc.warmup_steps, 20)})
    optimizer = configure_optimizer(model, scst_tc, device)
    aug_rng = torch.Generator()  # unused by SCST; kept so the training-state format is train's
    batches_per_epoch = -(-len(train_idx) // tc.scst_images)
    total_steps = tc.scst_epochs * batches_per_epoch
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_val": -math.inf, "elapsed_s": 0.0}
    if resume:
        progress = restore_training_state(last_dir, optimizer, aug_rng)
    else:
        progress["best_val"] = dev_cider(model, data.dev, device, precision)  # the starting point to beat
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("a")
    if not resume:
        log.write(json.dumps({"step": 0, "epoch": 0, "dev_cider": progress["best_val"]}) + "\n")
        save_pretrained(model, out / "best", {"dev_cider": round(progress["best_val"], 4), "scst_step": 0})
    step, t_start, elapsed_before = progress["step"], time.perf_counter(), progress["elapsed_s"]

    def save(best: bool, dev: float) -> None:
        progress.update(step=step, elapsed_s=elapsed_before + time.perf_counter() - t_start)
        metrics = {"scst_step": step, "dev_cider": round(dev, 4), "init": str(init_dir)}
        save_pretrained(model, out / "last", metrics, training_state_files(optimizer, progress, aug_rng))
        if best:
            save_pretrained(model, out / "best", metrics)

    bar = tqdm(total=total_steps, initial=step, desc="scst", unit="step", disable=not progress_bar,
               mininterval=0.1 if sys.stderr.isatty() else 10.0)
    stop, dev = StopOnInterrupt(), float("nan")
    model.train()
    try:
        for epoch in range(progress["epoch"], tc.scst_epochs):
            shuffle = torch.Generator().manual_seed(tc.seed * 1000 + epoch)  # a resumed run sees the same order
            order = train_idx[torch.randperm(len(train_idx), generator=shuffle)]
            for b in range(progress["batch"], batches_per_epoch):
                chosen = order[b * tc.scst_images:(b + 1) * tc.scst_images]
                lr = get_lr(step, total_steps, scst_tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["base_lr"] / scst_tc.lr
                images = images_to_device(train_set.images[chosen], train_set.is_features, model.cfg, device)
                stats = scst_step(model, optimizer, images, [cider.prepare(train_set.references[i])
                                                             for i in chosen.tolist()], cider, tc, precision, device)
                step, progress["batch"] = step + 1, b + 1
                bar.update(1)
                bar.set_postfix(reward=f"{stats['reward']:.3f}", epoch=epoch + 1, refresh=False)
                if step % tc.log_every == 0:
                    log.write(json.dumps({"step": step, "epoch": epoch + 1, **stats}) + "\n")
                    log.flush()
                if stop.requested:
                    raise KeyboardInterrupt
            dev = dev_cider(model, data.dev, device, precision)
            best = dev > progress["best_val"]
            progress.update(best_val=max(dev, progress["best_val"]), epoch=epoch + 1, batch=0)
            log.write(json.dumps({"step": step, "epoch": epoch + 1, "dev_cider": dev}) + "\n")
            log.flush()
            bar.write(f"scst epoch {epoch + 1}: dev CIDEr-D (greedy) {dev:.4f}", file=sys.stderr)
            save(best, dev)
    except KeyboardInterrupt:
        bar.close()
        raise stop.error(out, lambda: save(best=False, dev=dev), f"SCST step {step}") from None
    finally:
        stop.restore()
        bar.close()
        log.close()
    elapsed = time.perf_counter() - t_start
    return {"scst_steps": step, "best_dev_cider": progress["best_val"], "last_dev_cider": dev,
            "wall_time_s": elapsed, "total_time_s": elapsed_before + elapsed, "device": device,
            "precision": precision, "best": str(out / "best"), "last": str(out / "last")}
