"""Pretrain a reversible GPT on local text (default: the Python standard library's source).

    python examples/long_context_pretraining.py                                   # tiny, CPU, a minute
    python examples/long_context_pretraining.py --device cuda --model-size S --context-length 65536 \
        --batch-size 1 --precision bf16 --steps 200 --max-chars 50000000
"""
from __future__ import annotations

import argparse
import json

from revnet_zero.examples import LongContextPretraining


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", default="tiny", help="preset: tiny, S, M, llama8b")
    p.add_argument("--context-length", type=int, default=256, help="tokens (bytes) per sequence")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--gradient-accumulation", type=int, default=1)
    p.add_argument("--dataset", default="stdlib", help="'stdlib' or a local text file / folder")
    p.add_argument("--max-chars", type=int, default=400_000, help="characters of text to read")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out-dir", default=None, help="checkpoints and metrics (default: none written)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    run = LongContextPretraining(model_size=a.model_size, context_length=a.context_length, batch_size=a.batch_size,
                                 gradient_accumulation=a.gradient_accumulation, dataset=a.dataset,
                                 max_chars=a.max_chars, precision=a.precision, device=a.device)
    summary = run.run(steps=a.steps, out_dir=a.out_dir)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
