"""The walkthrough notebook runs from top to bottom against the current code."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_executes(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PICOVLM_NOTEBOOK_STEPS", "150")  # the same cells, a shorter training
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", [])) for i, cell in enumerate(nb.cells)}
    text = "\n".join(outputs.values())
    assert "pixels (1, 3, 112, 112)" in text and "proj   (1, 16, 128)" in text
    assert "logits          (1," in text and "exact_match" in text
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss curve and the attention maps
