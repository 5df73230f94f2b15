"""README.md and docs/*.md: every relative link resolves, every ```python block runs on CPU (and the
README's first block, the fifteen lines, gives finite gradients).

Blocks run top to bottom in one namespace per page (a later block may use an earlier one's names), in a
temporary working directory, so pages read like sessions. A block is skipped only when the line right
before its fence is ``<!-- skip-test: reason -->`` with a reason (a GPU, the network, a big model).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md")])   # links checked, code run
# links checked only (their code blocks are shell commands)
OTHER_PAGES = [ROOT / name for name in ("CONTRIBUTING.md", "CHANGELOG.md", "benchmarks/README.md",
                                         "benchmarks/results/README.md")]
RESULTS = ROOT / "benchmarks" / "results"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", flags=re.S | re.M)
SKIP = re.compile(r"^<!--\s*skip-test:\s*(\S.*?)\s*-->$")
# [text](target) and ![alt](target); the target ends at whitespace (an optional "title" follows) or ")"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) for every ```python fence of a Markdown text."""
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        skip = SKIP.match(before)
        if before.startswith("<!--") and "skip-test" in before and not skip:
            raise ValueError(f"line {line - 1}: a skip-test marker needs a reason: {before!r}")
        blocks.append((line, m.group(2), skip.group(1) if skip else None))
    return blocks


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository: no scheme, no mail, no bare #anchor; code is left out."""
    prose = FENCE.sub("", text)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    out = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def test_the_pages_exist_and_the_scanners_find_things():
    # a regex that matched nothing would make every test below pass vacuously
    assert (ROOT / "README.md") in PAGES and len(PAGES) >= 5
    readme = (ROOT / "README.md").read_text()
    assert python_blocks(readme) and relative_links(readme)
    sample = "x\n<!-- skip-test: needs a GPU -->\n```python\nimport os\n```\n[a](b.md#c) [d](https://e) `[f](g)`\n"
    assert python_blocks(sample) == [(3, "import os\n", "needs a GPU")]
    assert relative_links(sample) == ["b.md"]
    with pytest.raises(ValueError, match="needs a reason"):
        python_blocks("<!-- skip-test: -->\n```python\npass\n```\n")


@pytest.mark.parametrize("page", PAGES + OTHER_PAGES, ids=page_id)
def test_relative_links_resolve(page: Path):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page_id(page)} links to files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    blocks = python_blocks(page.read_text())
    for line, code, skip in blocks:
        if skip is None:
            exec(compile(code, f"{page_id(page)}:{line}", "exec"), namespace)  # noqa: S102 - the project's own docs
    if page == ROOT / "README.md":
        check_the_fifteen_lines(blocks[0][1], namespace)


def check_the_fifteen_lines(code: str, namespace: dict) -> None:
    """The README's first block is what users copy first: a reversible stack whose backward gives every
    input and parameter a finite gradient."""
    assert "ReversibleSequence" in code and "loss.backward()" in code and len(code.splitlines()) <= 16
    x, stack = namespace["x"], namespace["stack"]
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stack.parameters())


def test_the_results_index_lists_every_result_file():
    index = (RESULTS / "README.md").read_text()
    listed = set(relative_links(index))
    files = {p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md"}
    assert files and files <= listed, f"not in benchmarks/results/README.md: {sorted(files - listed)}"
