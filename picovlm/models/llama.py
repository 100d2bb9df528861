"""A Llama-style decoder, the language model of SmolLM2 and of nanoVLM.

References: Touvron et al. 2023 (LLaMA); Ainslie et al. 2023 (grouped-query attention);
Su et al. 2021 (RoPE); Zhang & Sennrich 2019 (RMSNorm); Shazeer 2020 (SwiGLU); Hugging Face
`LlamaForCausalLM`, whose weights load into this module unchanged (picovlm.pretrained_lm).

How it differs from the GPT-2 decoder in gpt2.py:
- no learned position table: positions enter as rotations of queries and keys (RoPE), so
  a KV cache just keeps counting, and the model has no fixed context table to outgrow;
- RMSNorm (scale only, no mean, no bias) instead of LayerNorm; no bias anywhere;
- grouped-query attention: H query heads share H_kv key/value heads, which shrinks the KV
  cache H / H_kv times (3x for SmolLM2-135M);
- a gated MLP, down(silu(gate(x)) * up(x)), instead of GELU between two linears.

Shapes, for a sequence of B rows and T new positions, D = lm_hidden_dim, H = lm_n_heads,
H_kv = lm_n_kv_heads, hd = D / H, F = lm_inter_dim, V = lm_vocab_size:

    input_ids (B, T) -> tok_emb, or inputs_embeds (B, T, D) directly   x (B, T, D)
    positions (B, T): cache.pos .. cache.pos + T - 1, or counted from the attention mask
    cos, sin = rope(positions)                                         (B, T, hd)
    per block:
      x = x + attn(norm1(x))
          q_proj: D -> H * hd       (B, H, T, hd), rotated by (cos, sin)
          k_proj: D -> H_kv * hd    (B, H_kv, T, hd), rotated; v_proj likewise, not rotated
          the cache appends k, v    (B, H_kv, T_k, hd) with T_k = cache.pos + T
          each kv head repeated H / H_kv times -> (B, H, T_k, hd)
          causal softmax(q k^T / sqrt(hd)) v     (B, H, T, hd) -> (B, T, D)
          o_proj: D -> D
      x = x + mlp(norm2(x))
          down_proj(silu(gate_proj(x)) * up_proj(x)): D -> F -> D
    norm_f(x)                                                          (B, T, D)
    lm_head: D -> V, tied to tok_emb when lm_tie_weights               logits (B, T, V)

SmolLM2-135M: D = 576, H = 9, H_kv = 3, hd = 64, F = 1536, 30 blocks, V = 49152, RoPE theta
100000, tied head: 134,515,008 parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from picovlm.config import SMOLLM2_135M, VLMConfig
from picovlm.kv_cache import KVCache


def smollm2_135m_config() -> VLMConfig:
    """The decoder of SmolLM2-135M (and -Instruct), as a VLMConfig with lm_type "llama"."""
    return VLMConfig(**SMOLLM2_135M)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In bf16 the mean of squares loses too many bits; Llama normalises in float32 and casts
        # back before the scale, and so does this, so that bf16 outputs match theirs too.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos and sin of RoPE's rotation angles, (B, T, hd), for integer positions (B, T).

    Dimension pair i turns by angle position * theta^(-2i / hd). The pairs are (j, j + hd/2),
    the "rotate half" layout of Hugging Face Llama (not interleaved (2j, 2j + 1)): the weights
    of a HF checkpoint assume it, and a GGUF file's q/k rows are permuted back to it on loading.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Recomputed on every call (hd/2 numbers) rather than kept as a buffer: state dicts stay
        # exactly those of HF Llama, and a model built on the meta device needs no fixing up.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))  # (hd/2,)
        # Angles in float32 even under bf16 autocast: a position of a few thousand times a
        # frequency near 1 needs more than bf16's 8 bits of mantissa.
        angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
        angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd): pair j and j + hd/2 share an angle
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, T, hd) by the angles of (cos, sin) (B, T, hd)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: VLMConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.lm_n_heads, cfg.lm_n_kv_heads
        self.n_kv_groups = self.n_heads // self.n_kv_heads  # query heads per key/value head
        self.head_dim = cfg.lm_hidden_dim // cfg.lm_n_heads
        self.layer_idx = layer_idx  # which slice of a KVCache belongs to this layer
        self.dropout = cfg.lm_dropout
        D, hd = cfg.lm_hidden_dim, self.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, H_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # The cache holds rotated keys: a key's rotation depends only on its own position.
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, T_k, hd)
        if self.n_kv_groups > 1:
            # Query head h reads key/value head h // n_kv_groups, as in HF's repeat_kv.
            k = k.repeat_interleave(self.n_kv_groups, dim=1)  # (B, H, T_k, hd)
            v = v.repeat_interleave(self.n_kv_groups, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * hd)  # (B, T, D)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the gate decides, per hidden unit, how much of up(x) passes."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.up_proj = nn.Linear(cfg.lm_hidden_dim, cfg.lm_inter_dim, bias=False)
        self.down_proj = nn.Linear(cfg.lm_inter_dim, cfg.lm_hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: VLMConfig, layer_idx: int):
        super().__init__()
        self.norm1 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.attn = GroupedQueryAttention(cfg, layer_idx)
        self.norm2 = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask, is_causal, cache)
        return x + self.mlp(self.norm2(x))


class LlamaDecoder(nn.Module):
    """Token embedding, lm_n_blocks LlamaBlocks, a final RMSNorm and the (tied) head.

    Attribute names and their Hugging Face `LlamaForCausalLM` counterparts:
    tok_emb = model.embed_tokens, blocks.N = model.layers.N (norm1 = input_layernorm,
    attn = self_attn, norm2 = post_attention_layernorm, mlp = mlp), norm_f = model.norm,
    lm_head = lm_head. `picovlm.pretrained_lm.HF_KEY_MAP` is that table for state dicts.
    """

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        cfg.validate_lm()
        if cfg.lm_type != "llama":
            raise ValueError(f"LlamaDecoder needs lm_type 'llama', got {cfg.lm_type!r}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.lm_vocab_size, cfg.lm_hidden_dim)
        self.rope = RotaryEmbedding(cfg.lm_hidden_dim // cfg.lm_n_heads, cfg.lm_re_base)
        self.blocks = nn.ModuleList([LlamaBlock(cfg, i) for i in range(cfg.lm_n_blocks)])
        self.norm_f = RMSNorm(cfg.lm_hidden_dim, cfg.lm_rms_eps)
        self.lm_head = nn.Linear(cfg.lm_hidden_dim, cfg.lm_vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.lm_tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # HF Llama's initialisation (initializer_range 0.02); RMSNorm weights start at one.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --- the forward pass ---------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                      cache: KVCache | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks over T new positions; return the final-normed states (B, T, D).

        Give input_ids (B, T), or inputs_embeds (B, T, D) (e.g. text embeddings with image
        embeddings spliced in; `tok_emb` makes the text part). With a cache, the T positions
        follow the cache.pos already stored, and the cache advances by T.

        attention_mask (B, cache.pos + T), 1 for real tokens and 0 for padding, covers every
        position so far, as in Hugging Face. Padded keys are never attended to, and positions
        count real tokens only, so a left-padded row computes what it would alone. Without a
        mask every position is real.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.tok_emb(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.lm_max_position_embeddings:
            raise ValueError(f"{start + T} positions exceed lm_max_position_embeddings "
                             f"{self.cfg.lm_max_position_embeddings}")
        positions, mask, is_causal = _positions_and_mask(B, T, start, attention_mask, x.device)
        cos, sin = self.rope(positions, x.dtype)  # (B, T, hd)
        for block in self.blocks:
            x = block(x, cos, sin, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)  # (B, T, D)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                cache: KVCache | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V) for the next token at each of the T positions; see hidden_states."""
        h = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, cache=cache, attention_mask=attention_mask)
        return self.lm_head(h)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KVCache for batch_size rows of up to max_len positions (prompt + generated).

        It stores the H_kv key/value heads, not the H query heads: grouped-query attention's
        saving. SmolLM2-135M in float32: 30 * 2 * 3 * 64 * 4 bytes = 46 KB per position and row.
        """
        cfg = self.cfg
        if max_len > cfg.lm_max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds lm_max_position_embeddings {cfg.lm_max_position_embeddings}")
        p = self.tok_emb.weight
        return KVCache(cfg.lm_n_blocks, batch_size, cfg.lm_n_kv_heads, max_len, cfg.lm_hidden_dim // cfg.lm_n_heads,
                       dtype=dtype or p.dtype, device=p.device)

    # --- conveniences -------------------------------------------------------

    def param_counts(self) -> dict[str, Any]:
        """Parameters per component; the tied head counted once (unique) and twice."""
        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters())

        parts = {"tok_emb": count(self.tok_emb), "blocks": count(self.blocks), "norm_f": count(self.norm_f),
                 "lm_head": self.lm_head.weight.numel()}
        unique = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        tied = self.lm_head.weight is self.tok_emb.weight
        return {
            "components": parts,
            "lm_head_tied": tied,
            "params_unique": unique,
            "params_with_tied_head": unique + (parts["lm_head"] if tied else 0),
        }


def _positions_and_mask(B: int, T: int, start: int, attention_mask: torch.Tensor | None,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Positions (B, T) of the T new tokens and the attention mask for scaled_dot_product_attention.

    Returns (positions, mask, is_causal): mask is None with is_causal for the plain cases, else
    a boolean (B or 1, 1, T, start + T) where True means "may attend".
    """
    t_k = start + T
    if attention_mask is None:
        positions = torch.arange(start, t_k, device=device).expand(B, T)
        if start == 0:
            return positions, None, True  # one causal sequence: the fused kernels' fast path
        if T == 1:
            return positions, None, False  # one new token sees the whole cache
        return positions, _causal_mask(T, t_k, device)[None, None], False
    if attention_mask.shape != (B, t_k):
        raise ValueError(f"attention_mask must be (B, cache.pos + T) = {(B, t_k)}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, T_k)
    # A token's position is the number of real tokens before it, so left padding shifts nothing.
    # (Padding positions get 0; their outputs are never used.) Hugging Face generate does the same.
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T)
    mask = _causal_mask(T, t_k, device)[None] & keep[:, None, :]  # (B, T, T_k)
    # Every query may also see itself: a padding query with no real key before it would
    # otherwise have an all-False row, which softmax turns into NaN.
    mask = mask | _diagonal(T, t_k, device)[None]
    return positions, mask[:, None], False  # (B, 1, T, T_k)


def _causal_mask(t_new: int, t_total: int, device: torch.device) -> torch.Tensor:
    """(t_new, t_total) boolean: new query i (at position t_total - t_new + i) sees keys up to itself."""
    rows = torch.arange(t_new, device=device)[:, None] + (t_total - t_new)
    return torch.arange(t_total, device=device)[None, :] <= rows


def _diagonal(t_new: int, t_total: int, device: torch.device) -> torch.Tensor:
    """(t_new, t_total) boolean: True where the key is the query itself."""
    rows = torch.arange(t_new, device=device)[:, None] + (t_total - t_new)
    return torch.arange(t_total, device=device)[None, :] == rows


@torch.no_grad()
def greedy_generate(model: LlamaDecoder, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with a KV cache: the argmax token, max_new_tokens times or until every row
    has produced eos_token_id. Returns the new tokens (B, n <= max_new_tokens); a row that has
    finished is filled with pad_token_id (default: eos), as Hugging Face generate does.

    input_ids (B, T) may be left-padded, with attention_mask (B, T) marking the real tokens.
    """
    B, T = input_ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    fill = eos_token_id if pad_token_id is None else pad_token_id
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out: list[torch.Tensor] = []
    next_input = input_ids
    for _ in range(max_new_tokens):
        h = model.hidden_states(next_input, cache=cache, attention_mask=attention_mask)[:, -1]  # (B, D)
        logits = model.lm_head(h)  # (B, V): only the last position's, the head being the widest matmul
        token = logits.argmax(-1)  # (B,)
        if fill is not None:
            token = torch.where(done, torch.full_like(token, fill), token)
        out.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
        next_input = token[:, None]  # (B, 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
    return torch.stack(out, dim=1) if out else input_ids.new_zeros(B, 0)
