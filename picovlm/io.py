"""Crash-safe file writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a temporary folder, then swap it in for `path` in one rename.

    The old folder is moved aside first and deleted after the swap, so at every instant
    either the old or the new complete folder exists (`find_complete_dir` picks it up).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_complete_dir(path: str | Path) -> Path:
    """`path`, or its `.old` twin if a crash struck between the two renames of `atomic_dir`."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_state_dict(expected: dict[str, Any], state: dict[str, Any], source: str, optional: set[str] = frozenset(),
                     unexpected_extra: list[str] = ()) -> None:
    """Raise a one-line UserError unless `state` has exactly the keys of `expected` (less `optional`)
    and their shapes; unexpected_extra are further names the caller could not place."""
    from picovlm.errors import UserError

    missing = sorted(set(expected) - set(state) - set(optional))
    unexpected = sorted([*unexpected_extra, *(k for k in state if k not in expected)])
    if missing or unexpected:
        raise UserError(f"{source} does not match its config.json: missing {missing[:3]}"
                        f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                        f"{'...' if len(unexpected) > 3 else ''}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise UserError(f"{source}: tensor shapes do not match config.json: {'; '.join(wrong[:3])}")
