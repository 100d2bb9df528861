"""Uploading a checkpoint folder to the Hugging Face Hub (downloading is in checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from picovlm.checkpoint import CHECKPOINT_FILES, from_pretrained
from picovlm.errors import UserError, first_line


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Check that `model_dir` loads, then upload its checkpoint files; returns the repo URL."""
    from huggingface_hub import HfApi

    from_pretrained(model_dir)  # refuse to publish a folder that would not load
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(model_dir),
                          allow_patterns=list(CHECKPOINT_FILES),
                          commit_message="Upload picovlm checkpoint")
    except Exception as e:  # network, auth, permissions
        reason = first_line(e)
        raise UserError(f"cannot upload to {repo_id!r} ({reason}); log in with 'hf auth login' "
                        f"and check your connection") from None
    return str(url)
