"""arctic-training's per-rank entry point under an allocator cap, for ``finetune_alst --memory-cap-gib``.

DeepSpeed's launcher starts it as a module in place of ``arctic_training_run`` (same arguments); the cap
(``REVNET_MEMORY_CAP_GIB``, set by the runner) is applied with ``torch.cuda.set_per_process_memory_fraction``
before arctic-training allocates anything, as the other runners apply it in their own process.
"""
from __future__ import annotations

import os
import sys

import torch


def main() -> int:
    gib = float(os.environ["REVNET_MEMORY_CAP_GIB"])
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    if not 0 < gib <= total:
        raise ValueError(f"REVNET_MEMORY_CAP_GIB must be in (0, {total:.2f}], got {gib}")
    torch.cuda.set_per_process_memory_fraction(gib / total, 0)
    from arctic_training.entrypoint import launch
    sys.argv[0] = "arctic_training_run"
    return launch()


if __name__ == "__main__":
    sys.exit(main())
