"""picovlm: tiny vision-language models you can read, train and ship, in pure PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from picovlm.models.nanovlm import NanoVLM
    from picovlm.models.supravl import SupraVL


def load(dir_or_repo: str, device: str = "cpu", dtype: torch.dtype | None = None) -> SupraVL | NanoVLM:
    """Load a checkpoint folder or Hugging Face Hub repo id: a SupraVL (with `.caption()`) or a
    NanoVLM (with `.generate()`), as its config.json says, tokenizer attached."""
    from picovlm.checkpoint import from_pretrained

    return from_pretrained(dir_or_repo, device=device, dtype=dtype)


__all__ = ["__version__", "load"]
