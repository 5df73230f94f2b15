"""The README's first code block is what users copy first: it must run as printed."""
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_fifteen_lines_run_as_printed():
    block = python_blocks()[0]
    assert "ReversibleSequence" in block and "loss.backward()" in block
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)   # noqa: S102 - the project's own README
    x, stack = ns["x"], ns["stack"]
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stack.parameters())
