"""README's Python blocks run as written (issue 18), so README cannot drift from the code.

Convention: a ```python block of README.md runs as it stands (offline, on the CPU, in a fresh namespace, in a temporary
working folder) unless the line above its fence (blank lines aside) is the HTML comment

    <!-- needs-weights -->            the block needs files dalpsr does not ship (SD2, LLaVA, DA-CLIP, a DAT .pth)
    <!-- needs-weights: lr, decoder --> ... and takes these names from the text around it

A marked block is still checked as far as it can be without the weights: it compiles, its imports import, and every
name it reads is imported, assigned in the block, a builtin, or listed in its marker.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = re.compile(r"^<!--\s*needs-weights\s*(?::\s*(?P<names>[\w\s,]*?))?\s*-->$")


def readme_blocks(text: str) -> list[tuple[int, str, set[str] | None]]:
    """(first line number, code, None to run it or the set of names it takes from the text) per ```python block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, j = i + 1, i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise ValueError(f"README.md:{i + 1}: ```python block is never closed")
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marker = MARKER.match(lines[k].strip()) if k >= 0 else None
            uses = None
            if marker:
                uses = {n.strip() for n in (marker.group("names") or "").split(",") if n.strip()}
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n", uses))
            i = j
        i += 1
    return blocks


def free_names(code: str) -> set[str]:
    """Names the block reads but never binds (imports, assignments, loop targets, defs, ...), builtins excluded."""
    tree = ast.parse(code)
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound - set(dir(builtins))


BLOCKS = readme_blocks(README.read_text(encoding="utf-8")) if README.is_file() else []
# each block padded with blank lines so that errors point at README's own line numbers
RUNNABLE = [pytest.param("\n" * (ln - 1) + code, id=f"README.md:{ln}") for ln, code, uses in BLOCKS if uses is None]
MARKED = [
    pytest.param("\n" * (ln - 1) + code, uses, id=f"README.md:{ln}") for ln, code, uses in BLOCKS if uses is not None
]


def test_readme_has_python_blocks_and_the_markers_are_well_formed():
    text = README.read_text(encoding="utf-8")
    assert BLOCKS, "README.md has no ```python block"
    stray = [ln for ln in text.splitlines() if "needs-weights" in ln and not MARKER.match(ln.strip())]
    assert not stray, f"malformed needs-weights marker(s): {stray}"
    assert text.count("needs-weights") == len(MARKED), "a needs-weights marker that is not above a ```python block"


@pytest.mark.parametrize("code", RUNNABLE)
def test_readme_block_runs(code, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - README is ours
    finally:
        torch.set_num_threads(threads)
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize(("code", "uses"), MARKED)
def test_readme_block_needing_weights_is_consistent(code, uses):
    tree = ast.parse(code)  # it compiles
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
    exec(compile(ast.Module(body=imports, type_ignores=[]), str(README), "exec"), {})  # noqa: S102 - its imports import
    missing = free_names(code) - uses
    assert not missing, (
        f"names used but never imported or defined (list them in the marker if the text gives them): {missing}"
    )


def test_free_names_and_markers_are_read_right():
    assert free_names("import torch\nx = torch.ones(1)\nprint(x, y)\nfor i in range(2): pass\n") == {"y"}
    blocks = readme_blocks("a\n<!-- needs-weights: lr, decoder -->\n\n```python\nx = lr\n```\n```python\n1\n```\n")
    assert blocks == [(5, "x = lr\n", {"lr", "decoder"}), (8, "1\n", None)]
