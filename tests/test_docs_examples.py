"""Every ```python block of README.md and docs/*.md runs as written (issue 20: several used undefined
names). Each block runs in a fresh namespace, from the repository root, with the output files it writes
kept in a temporary directory."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def _blocks():
    for document in DOCUMENTS:
        for number, match in enumerate(BLOCK.finditer(document.read_text())):
            yield pytest.param(match.group(1), id=f"{document.relative_to(ROOT)}#{number}")


def test_every_document_with_python_has_its_blocks_collected():
    assert len(list(_blocks())) >= 6


@pytest.mark.parametrize("code", list(_blocks()))
def test_code_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block saves (an index) land here
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_help_shows_its_whole_first_paragraph(example):
    """`examples/<x>.py --help` prints its docstring's first paragraph whole (render_scene.py's was cut at the
    first line break, mid-sentence)."""
    doc = ast.get_docstring(ast.parse(example.read_text()))
    first = " ".join(doc.split("\n\n")[0].split())
    out = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert first in " ".join(out.stdout.split()), out.stdout
