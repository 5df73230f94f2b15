"""Compare memory policies and couplings, and how activation memory scales with length and depth; plot it.

    python examples/memory_research.py --out-dir memory-study                      # tiny, CPU
    python examples/memory_research.py --device cuda --model-size S --seq-length 32768 \
        --seq-lengths 8192,16384,32768 --num-layers 4,8 --out-dir memory-study
"""
from __future__ import annotations

import argparse
import json

from revnet_zero.research import MemoryEfficientResearch


def int_list(text: str) -> list[int]:
    """``'64,128'`` -> ``[64, 128]``; anything else is a usage error naming the item."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny", help="preset: tiny, S, M, llama8b")
    p.add_argument("--seq-length", type=int, default=128, help="tokens for the policy and coupling comparisons")
    p.add_argument("--seq-lengths", type=int_list, default="64,128,256", help="lengths of the scaling study")
    p.add_argument("--num-layers", type=int_list, default="2,4", help="depths of the scaling study")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out-dir", default="memory-study")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    study = MemoryEfficientResearch(model_size=a.model_size, seq_length=a.seq_length, device=a.device)
    results = study.run(a.out_dir, seq_lengths=a.seq_lengths, num_layers=a.num_layers)
    print(json.dumps({k: results["scaling"][k] for k in ("measure", "bytes_per_token", "bytes_per_layer")}, indent=1))
    return results


if __name__ == "__main__":
    main()
