"""docs/attention.md: every python block runs, top to bottom in one namespace, as printed."""
import re
import warnings
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "attention.md"


def test_attention_page_blocks_run():
    text = PAGE.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            exec(compile(block, f"{PAGE.name} block {i}", "exec"), ns)   # noqa: S102 - the project's own docs
    assert ns["y"].shape == (1, 30, 64) and ns["out"].shape == (2, 15)
    assert "sliding-window attention (w=16)" in ns["trainer"].attention_change
