"""SupraVL: a CNN vision encoder and a GPT-2 decoder fused by prefix concatenation.

The vision encoder is SupraVL-Nano's small CNN trained from scratch (vision_type "cnn") or a
frozen ImageNet MobileNetV2 with a trainable projector (vision_type "mobilenet_v2", see
models/mobilenet_v2.py); both turn images into (B, grid*grid, D) visual tokens.

The whole path from pixels to the next token, with the `supravl-nano` preset
(B images, T text tokens, D = 128, V = 2048):

    images (B, 3, 112, 112)
      -> vis_enc (vision_cnn.CNNEncoder)              visual tokens  (B, 16, D)
    input_ids (B, T)  [<bos>, w1, w2, ...]
      -> tok_emb                                      text tokens    (B, T, D)
    cat([visual, text], dim=1)                        sequence       (B, 16 + T, D)
      + pos_emb(0 .. 16 + T - 1)                      learned absolute positions
      -> blocks (gpt2.Block x 3, causal)              (B, 16 + T, D)
      -> ln_f, keep the T text positions              (B, T, D)
      -> lm_head (tied to tok_emb)                    logits (B, T, V)

Text position t predicts input_ids[t + 1]; the visual tokens are context only and carry
no loss. Because attention is causal over the whole sequence, every visual token sees only
the visual tokens before it, and every text token sees all 16 of them.

Attribute names (`vis_enc`, `tok_emb`, `pos_emb`, `blocks.N.*`, `ln_f`, `lm_head`) follow
the published SupraVL-Nano-900k checkpoint so that checkpoints move both ways.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from picovlm.config import VLMConfig
from picovlm.errors import UserError
from picovlm.kv_cache import KVCache
from picovlm.models.gpt2 import Block
from picovlm.models.mobilenet_v2 import MobileNetV2Encoder
from picovlm.models.vision_cnn import CNNEncoder

if TYPE_CHECKING:
    from picovlm.neighbours import CaptionIndex
    from picovlm.tokenizer import CaptionTokenizer

IGNORE_INDEX = -100  # target value for positions that carry no loss (padding)


class SupraVL(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        cfg.validate()
        if cfg.family != "supravl":
            raise UserError("this config describes a NanoVLM (vit + llama); build it with picovlm.models.nanovlm")
        self.cfg = cfg
        # A pretrained backbone starts random here; load_pretrained_vision() or a checkpoint fills it.
        self.vis_enc = MobileNetV2Encoder(cfg) if cfg.vision_type == "mobilenet_v2" else CNNEncoder(cfg)
        self.tok_emb = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.pos_emb = nn.Embedding(cfg.context_len, cfg.lm_hidden_dim)
        self.drop = nn.Dropout(cfg.lm_dropout)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.lm_n_blocks)])
        self.ln_f = nn.LayerNorm(cfg.lm_hidden_dim)
        self.lm_head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layers) so the residual
        # stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.lm_n_blocks))
        if cfg.lm_tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.tokenizer: CaptionTokenizer | None = None  # attached by picovlm.load / training
        # The decoding this model's captions default to (GenerationConfig fields), saved as the
        # checkpoint's generation_config.json; empty: GenerationConfig's defaults (beam, width 3).
        self.generation: dict[str, Any] = {}
        # The training images' features and captions that --mbr-neighbours reads (picovlm.neighbours),
        # kept beside the weights as neighbours.safetensors; None: the checkpoint has no index.
        self.neighbours: CaptionIndex | None = None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for separate learning rates or freezing: the encoder's projection to
        the decoder's width is the projector; the decoder and its embeddings are the language part."""
        projector = list(self.vis_enc.proj.parameters())
        ids = {id(p) for p in projector}
        return {"vision": [p for p in self.vis_enc.parameters() if id(p) not in ids], "projector": projector,
                "language": [p for name, p in self.named_parameters() if not name.startswith("vis_enc.")]}

    def load_pretrained_vision(self) -> None:
        """Fill a pretrained vision backbone with its ImageNet weights (cfg.vision_weights).

        Only for a new model about to be trained: a checkpoint already holds the backbone. A no-op
        for the CNN encoder, which has no pretrained weights.
        """
        if isinstance(self.vis_enc, MobileNetV2Encoder):
            self.vis_enc.load_imagenet_weights(self.cfg.vision_weights)

    # --- the forward pass ---------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, n_vis_tokens, D) visual tokens."""
        return self.vis_enc(images)

    def hidden_states(self, input_ids: torch.Tensor, visual: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Run the decoder over [visual?, input_ids]; return the final-normed states of the text.

        input_ids (B, T); visual (B, P, D) is given once, on the first call for a sequence.
        With a cache, positions continue from `cache.pos`. Returns (B, T, D).
        """
        x = self.tok_emb(input_ids)  # (B, T, D)
        n_text = x.shape[1]
        if visual is not None:
            x = torch.cat([visual.to(x.dtype), x], dim=1)  # (B, P + T, D)
        start = cache.pos if cache is not None else 0
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        x = self.drop(x + self.pos_emb(positions))  # (B, P + T, D)
        for block in self.blocks:
            x = block(x, cache)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.ln_f(x[:, -n_text:])  # (B, T, D)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                words: torch.Tensor | None = None, loss_only: bool = False, label_smoothing: float = 0.0,
                word_loss: float = 0.0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Training/eval pass. images (B, 3, H, W), input_ids and targets (B, T).

        Returns logits (B, T, V) and the mean cross-entropy over targets != IGNORE_INDEX.
        loss_only (training): the head runs only where a target exists, logits are None.
        label_smoothing: the target distribution puts 1 - eps on the target, eps spread uniformly
        over the vocabulary (Szegedy et al. 2016); training only.
        word_loss > 0 (training, with loss_only): the loss returned is the caption loss plus word_loss
        times words_loss(visual, words), words (B, V) bool, each row weighted by its caption's
        targets like the caption loss, so that a batch's loss does not depend on how it is split
        into micro-batches or processes.
        """
        if word_loss > 0 and (words is None or not loss_only):
            raise ValueError("word_loss needs the words of each image, and loss_only")
        visual = self.encode_images(images)  # (B, P, D)
        h = self.hidden_states(input_ids, visual)  # (B, T, D)
        if loss_only:
            # Padding carries no loss, and the head (D x V) is the largest matmul of the decoder:
            # skip it there. (N, D) -> (N, V) for the N real targets.
            keep = targets != IGNORE_INDEX
            logits = self.lm_head(h[keep])
            loss = F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)
            if word_loss > 0:
                n_targets = keep.sum(1).float()  # (B,)
                loss = loss + word_loss * (self.words_loss(visual, words) * n_targets).sum() / n_targets.sum()
            return None, loss
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   label_smoothing=label_smoothing)
        return logits, loss

    def words_loss(self, visual: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Bag-of-words loss: can an image's visual tokens tell which tokens its captions use?

        visual (B, P, D) tokens, words (B, V) bool (the tokens of all the image's reference captions;
        BPE pieces with the default tokenizer) -> (B,) one loss per row:

            visual.mean(1)                     (B, D)   the whole image
            @ tok_emb.weight.T                 (B, V)   a score per token: no new parameters
            cross-entropy against words / words.sum(1)  (the tokens' uniform distribution)

        The caption loss reaches the encoder only through the decoder's attention; this one asks the
        visual tokens directly to lie near the embeddings of the tokens people use for the image, a
        stronger signal for an encoder trained from scratch (Joulin et al. 2016 pretrain on it).
        The token embeddings (with tied weights also the output head) learn from it too: both sides
        meet in one space."""
        scores = visual.mean(1) @ self.tok_emb.weight.T  # (B, V)
        share = words.float() / words.sum(1, keepdim=True).clamp(min=1)  # (B, V), rows sum to 1
        return F.cross_entropy(scores.float(), share, reduction="none")

    def next_token_logits(self, input_ids: torch.Tensor, visual: torch.Tensor | None = None,
                          cache: KVCache | None = None) -> torch.Tensor:
        """Logits for the token after the last of input_ids: (B, V), in float32."""
        h = self.hidden_states(input_ids, visual, cache)[:, -1]  # (B, D)
        return self.lm_head(h).float()

    def new_cache(self, batch_size: int, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.cfg
        p = self.tok_emb.weight
        return KVCache(cfg.lm_n_blocks, batch_size, cfg.lm_n_heads, cfg.context_len,
                       cfg.lm_hidden_dim // cfg.lm_n_heads, dtype=dtype or p.dtype, device=p.device)

    # --- conveniences -------------------------------------------------------

    def param_counts(self) -> dict[str, Any]:
        """Parameters per component; the tied head counted once (unique) and twice; trainable
        (requires_grad) and frozen (a pretrained backbone), which add up to params_unique."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        parts = {
            "vis_enc": count(self.vis_enc),
            "tok_emb": count(self.tok_emb),
            "pos_emb": count(self.pos_emb),
            "blocks": count(self.blocks),
            "ln_f": count(self.ln_f),
            "lm_head": self.lm_head.weight.numel(),
        }
        unique = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        tied = self.cfg.lm_tie_weights
        return {
            "components": parts,
            "lm_head_tied": tied,
            "params_unique": unique,
            "params_with_tied_head": unique + (parts["lm_head"] if tied else 0),
            "trainable": trainable,
            "frozen": unique - trainable,
        }

    def save_pretrained(self, out_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
        """Write model.safetensors + config.json + tokenizer.json + README.md (see picovlm.checkpoint)."""
        from picovlm.checkpoint import save_pretrained

        return save_pretrained(self, out_dir, metrics)

    @classmethod
    def from_pretrained(cls, dir_or_repo: str | Path, device: str = "cpu") -> SupraVL:
        """Load a checkpoint folder or Hugging Face Hub repo id."""
        from picovlm.checkpoint import from_pretrained

        return from_pretrained(dir_or_repo, device=device)

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Save to a temporary folder and upload it to the Hub; returns the repo URL."""
        import tempfile

        from picovlm.hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            return push_to_hub(self.save_pretrained(Path(tmp) / "model"), repo_id, private=private, token=token)

    @torch.inference_mode()
    def caption(self, images: Any, strategy: str | None = None, **kwargs: Any) -> list[str]:
        """Caption images (paths, PIL images, or a (B, 3, H, W) tensor) with the model's own decoding
        (self.generation), or the strategy and settings given; see picovlm.generate.resolve_generation."""
        from picovlm.generate import caption_images

        return caption_images(self, images, strategy=strategy, **kwargs)
