"""NanoVLM: a SigLIP-style ViT, a pixel-shuffle projector and a Llama-style decoder, fused by
image-token placeholders. The whole path, with the `nanovlm-222m` preset (B conversations of T
tokens holding N images in all; D_v = 768, r = 2, D = 576, V = 49152):

    images (N, 3, 224, 224)
      -> vision_encoder (vit.ViT)                      patch embeddings    (N, 196, 768)
      -> projector (projector.ModalityProjector)       pixel shuffle r=2   (N, 49, 3072)
                                                       Linear -> D         (N, 49, 576)
    input_ids (B, T), 49 image tokens per image
      -> decoder.tok_emb (image tokens read as 0)      text embeddings     (B, T, 576)
      -> fusion.replace_image_tokens                   image tokens' rows := image embeddings
      -> decoder blocks (llama.LlamaBlock x 30)        RoPE, GQA 9/3 heads, SwiGLU
      -> norm_f, lm_head (tied)                        logits              (B, T, 49152)

The image token's id is lm_vocab_size, one past the language model's vocabulary: it never has
an embedding row of its own (its places are filled with image embeddings before the decoder sees
them) and is never predicted, so a pretrained decoder loads unchanged and parameter counts are
the language model's own. Loss: position t predicts labels[t + 1]; the labels carry loss only on
the assistant's answers (picovlm.chat).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from picovlm.chat import IMAGE_TOKEN as IMAGE_TOKEN_NAME
from picovlm.config import VLMConfig
from picovlm.errors import UserError
from picovlm.kv_cache import KVCache
from picovlm.models.fusion import replace_image_tokens
from picovlm.models.llama import LlamaDecoder
from picovlm.models.projector import ModalityProjector
from picovlm.models.supravl import IGNORE_INDEX
from picovlm.models.vit import ViT


class NanoVLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision_encoder = ViT(cfg)
        self.projector = ModalityProjector(cfg)
        self.decoder = LlamaDecoder(cfg)
        self.tokenizer: Any = None  # a tokenizers.Tokenizer with the image token, attached by loaders

    @property
    def image_token_id(self) -> int:
        return self.cfg.image_token_id if self.cfg.image_token_id >= 0 else self.cfg.lm_vocab_size

    def load_pretrained_parts(self) -> Any:
        """Fill the ViT and/or the decoder from cfg.vit_weights / cfg.lm_weights (a new model about to
        be trained; a checkpoint holds everything). Returns the language model's tokenizer, with the
        image token added, when its weights were loaded, else None."""
        tokenizer = None
        if self.cfg.vit_weights:
            from picovlm.siglip import load_siglip_vit

            vit, _ = load_siglip_vit(self.cfg.vit_weights, self.cfg.vit_img_size)
            self.vision_encoder.load_state_dict(vit.state_dict())
        if self.cfg.lm_weights:
            tokenizer = self._load_language_model(self.cfg.lm_weights)
        return tokenizer

    def _load_language_model(self, source: str) -> Any:
        from tokenizers import Tokenizer

        from picovlm.chat import add_image_token
        from picovlm.pretrained_lm import load_llama, resolve_lm_dir, smollm2_135m_instruct_dir

        folder = smollm2_135m_instruct_dir() if source == "smollm2-135m-instruct" else resolve_lm_dir(source)
        decoder = load_llama(folder)
        ours, theirs = self.decoder.state_dict(), decoder.state_dict()
        wrong = [k for k in ours if k not in theirs or ours[k].shape != theirs[k].shape]
        if wrong:
            raise UserError(f"{source} does not fit this config's decoder (e.g. {wrong[0]}); take the lm_ fields "
                            f"from its config.json")
        self.decoder.load_state_dict(theirs)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        image_id = add_image_token(tokenizer)
        if image_id != self.image_token_id:
            raise UserError(f"{source}'s tokenizer gives {IMAGE_TOKEN_NAME} id {image_id}, not "
                            f"{self.image_token_id}; set lm_vocab_size to its vocabulary size")
        return tokenizer

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by part, for separate learning rates or freezing."""
        return {"vision": list(self.vision_encoder.parameters()), "projector": list(self.projector.parameters()),
                "language": list(self.decoder.parameters())}

    @property
    def tokens_per_image(self) -> int:
        grid = self.cfg.vit_img_size // self.cfg.vit_patch_size
        return (grid // self.cfg.mp_pixel_shuffle_factor) ** 2

    # --- the forward pass ---------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, tokens_per_image, lm_hidden_dim) image embeddings."""
        return self.projector(self.vision_encoder(images))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids with image tokens, and the batch's (N, 3, H, W) images in text order -> (B, T, D)."""
        is_image = input_ids == self.image_token_id
        text = self.decoder.tok_emb(input_ids.masked_fill(is_image, 0))  # (B, T, D); image rows replaced next
        if images is None or images.shape[0] == 0:
            if is_image.any():
                raise ValueError("the text holds image tokens but no images were given")
            return text
        return replace_image_tokens(text, input_ids, self.encode_images(images), self.image_token_id)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_only: bool = False, label_smoothing: float = 0.0,
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids, attention_mask, labels (B, T); images (N, 3, H, W). Returns logits (B, T, V)
        and the mean cross-entropy of position t predicting labels[t + 1] where that is not
        IGNORE_INDEX. loss_only (training): the head runs only where a label exists."""
        h = self.decoder.hidden_states(inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask)
        if labels is None:
            return self.decoder.lm_head(h), None
        targets = labels[:, 1:]
        if loss_only:
            keep = targets != IGNORE_INDEX
            logits = self.decoder.lm_head(h[:, :-1][keep])  # (n_targets, V)
            return None, F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)
        logits = self.decoder.lm_head(h)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               label_smoothing=label_smoothing)
        return logits, loss

    # --- generation -----------------------------------------------------------

    def session(self, input_ids: torch.Tensor, images: torch.Tensor | None, attention_mask: torch.Tensor | None,
                max_new_tokens: int, use_cache: bool = True) -> _PromptSession:
        """A picovlm.generate.DecodingSession continuing left-padded prompts (B, T)."""
        return _PromptSession(self, input_ids, images, attention_mask, max_new_tokens, use_cache)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, images: torch.Tensor | None,
                 attention_mask: torch.Tensor | None = None, gen: Any = None) -> list[list[int]]:
        """New tokens after each left-padded prompt, cut before the end-of-turn token; any
        strategy of picovlm.generate (greedy, sample, top-k, top-p, beam, mbr), batched, with the KV cache."""
        from picovlm.generate import GenerationConfig, decode

        gen = gen or GenerationConfig(strategy="greedy")
        gen.validate()
        if gen.n_views > 1:
            raise ValueError("mirror and centre-crop decoding are for SupraVL captioners; a NanoVLM prompt may "
                             "name left and right, or what lies at the edges")
        if gen.mbr_neighbours is not None:
            raise ValueError("--mbr-neighbours reads a captioner's index of training captions; a NanoVLM has none")
        self.eval()
        room = self.cfg.lm_max_position_embeddings - input_ids.shape[1]
        n_steps = max(0, min(gen.max_new_tokens or 64, room))
        session = self.session(input_ids, images, attention_mask, n_steps, gen.use_cache)
        return decode(session, input_ids[:, -1:], gen, self.cfg.eos_token_id, n_steps)

    # --- conveniences -------------------------------------------------------

    def save_pretrained(self, out_dir: Any, metrics: dict[str, Any] | None = None) -> Any:
        """Write model.safetensors + config.json + tokenizer.json + README.md (see picovlm.checkpoint)."""
        from picovlm.checkpoint import save_pretrained

        return save_pretrained(self, out_dir, metrics)

    def param_counts(self) -> dict[str, Any]:
        """Parameters of the vision encoder, the projector and the language model (tied head once)."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        vit, mp, lm = count(self.vision_encoder), count(self.projector), count(self.decoder)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"vit_params": vit, "mp_params": mp, "lm_params": lm, "params_unique": vit + mp + lm,
                "lm_head_tied": self.decoder.lm_head.weight is self.decoder.tok_emb.weight,
                "trainable": trainable, "frozen": vit + mp + lm - trainable}


class _PromptSession:
    """Prefill the fused prompts once, then one token per step (or the whole sequence again
    without a cache); the attention mask grows by one real position per step."""

    def __init__(self, model: NanoVLM, input_ids: torch.Tensor, images: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, max_new_tokens: int, use_cache: bool):
        B, T = input_ids.shape
        self.model = model
        self.prompt = model.embed(input_ids, images)  # (B, T, D)
        self.mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.cache: KVCache | None = model.decoder.new_cache(B, T + max_new_tokens + 1) if use_cache else None

    def prefill(self) -> torch.Tensor:
        h = self.model.decoder.hidden_states(inputs_embeds=self.prompt, cache=self.cache, attention_mask=self.mask)
        return self.model.decoder.lm_head(h[:, -1]).float()  # (B, V)

    def step(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs (N, 1 + t): the prompt's last token, then the t tokens generated so far."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        decoder = self.model.decoder
        if self.cache is not None:
            h = decoder.hidden_states(seqs[:, -1:], cache=self.cache, attention_mask=self.mask)
        else:
            embeds = torch.cat([self.prompt, decoder.tok_emb(seqs[:, 1:])], dim=1)
            h = decoder.hidden_states(inputs_embeds=embeds, attention_mask=self.mask)
        return decoder.lm_head(h[:, -1]).float()

    def select_rows(self, rows: torch.Tensor) -> None:
        self.mask, self.prompt = self.mask[rows], self.prompt[rows]
        if self.cache is not None:
            self.cache.reorder(rows)
