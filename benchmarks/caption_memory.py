"""Peak memory (RSS) of a fresh `picovlm caption` process, beside a process that only imports torch.

Each command runs in its own child process; the peak comes from the kernel's accounting of that
child (ru_maxrss). Prints JSON.

    python benchmarks/caption_memory.py --model runs/demo/best IMAGE [IMAGE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def peak_rss_mb(cmd: list[str]) -> float:
    """Run cmd in a fresh process (via a one-shot wrapper, so earlier children don't count)."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "stdout=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024  # Linux reports KiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("images", nargs="+")
    args = p.parse_args()
    caption = [sys.executable, "-m", "picovlm.cli", "caption", *args.images, "--model", args.model]
    report = {
        "benchmark": "caption_memory",
        "picovlm_caption_peak_rss_mb": peak_rss_mb(caption),
        "import_torch_only_peak_rss_mb": peak_rss_mb([sys.executable, "-c", "import torch"]),
        "target_mb": 300,
    }
    report["within_target"] = report["picovlm_caption_peak_rss_mb"] <= report["target_mb"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
