"""Convert a GPT-2 / Llama-architecture model, fine-tune it on long documents with questions, evaluate.

    python examples/document_qa.py                                          # tiny GPT-2 shape, CPU
    python examples/document_qa.py --device cuda --architecture llama --model-size base \
        --context-length 8192 --batch-size 2 --steps 500 --eval-documents 100
"""
from __future__ import annotations

import argparse
import json

from revnet_zero.examples import DocumentQA


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--architecture", default="gpt2", help="gpt2 or llama (built from its config, random weights)")
    p.add_argument("--model-size", default="tiny", help="tiny, small or base")
    p.add_argument("--context-length", type=int, default=512, help="bytes per document with its question")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-documents", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    qa = DocumentQA(architecture=a.architecture, model_size=a.model_size, context_length=a.context_length,
                    batch_size=a.batch_size, device=a.device)
    losses = qa.finetune(steps=a.steps)
    result = {"loss_first": losses[0], "loss_last": losses[-1], **qa.evaluate(num_documents=a.eval_documents)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
