"""The README's code blocks: the first runs as printed, the model and conversion blocks at tiny sizes."""
import copy
import os
import re

import pytest
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


def block_with(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


def shrink(block: str, replacements: list[tuple[str, str]]) -> str:
    """The block at tiny sizes: each (literal, replacement) must occur exactly once, so an edited README
    fails here by name instead of running something else."""
    for old, new in replacements:
        assert block.count(old) == 1, f"README block no longer contains {old!r}: update this test"
        block = block.replace(old, new)
    return block


def test_the_model_block_runs_at_tiny_size():
    block = shrink(block_with("ReversibleTransformer("), [
        ("num_layers=24, d_model=1024, num_heads=16, max_seq_len=262144",
         "num_layers=2, d_model=32, num_heads=2, vocab_size=50, max_seq_len=64")])
    ns = {"input_ids": torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))}
    exec(compile(block, "README.md", "exec"), ns)   # noqa: S102 - the project's own README
    model, out = ns["model"], ns["out"]
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_conversion_block_runs_on_a_tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    block = shrink(block_with("convert_to_reversible"), [
        ('GPT2LMHeadModel.from_pretrained("gpt2")', "tiny_gpt2()")])  # no download in CI
    original = []

    def tiny_gpt2():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        original.append(transformers.GPT2LMHeadModel(cfg).eval())
        return copy.deepcopy(original[0])

    ns = {"tiny_gpt2": tiny_gpt2}
    exec(compile(block, "README.md", "exec"), ns)   # noqa: S102 - the project's own README
    plain = ns["plain"].eval()
    assert type(plain).__name__ == "GPT2LMHeadModel"
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # converted there and back, untrained: the same weights and the same layers
        assert torch.equal(plain(ids).logits, original[0](ids).logits)
