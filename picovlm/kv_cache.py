"""A pre-allocated key/value cache for autoregressive decoding.

Without a cache every new token re-runs the whole sequence through the decoder. With one,
the prefix (visual tokens + prompt) is processed once ("prefill"), and each later step runs
one token per sequence, attending to the keys and values stored from earlier steps.

Storage per layer: keys and values of shape (B, n_heads, max_len, head_dim), allocated once.
`pos` is how many positions are filled; it is shared by all rows because every row of a
batch advances by the same number of tokens each step (finished rows just feed padding).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch_size: int, n_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, batch_size, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T_new, hd) at [pos, pos+T_new); return all keys/values so far.

        The caller advances `pos` once per forward pass (after the last layer), via `advance`.
        """
        t_new = k.shape[2]
        end = self.pos + t_new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H, end, hd)

    def advance(self, n: int) -> None:
        self.pos += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` (in that order), e.g. the parents of the surviving beams."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)

    def repeat_rows(self, n: int) -> None:
        """Repeat each row n times in place: row b becomes rows b*n ... b*n + n-1 (beam search)."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
