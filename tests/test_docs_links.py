"""Every in-repository link of the README, the docs and RESULTS.md resolves: the file exists and, for a
`#anchor`, a heading of that file has it (GitHub's rule: lower case, punctuation other than - and _
dropped, spaces to hyphens). The README's headline numbers link into RESULTS.md, so a renamed section
must not leave them pointing nowhere."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # headings in code blocks are not headings
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


def test_anchor_rule():
    assert _anchor("Before/after the 2026-12-07 restructuring — quick set, 11:43 to 12:03 UTC") == (
        "beforeafter-the-2026-12-07-restructuring--quick-set-1143-to-1203-utc"
    )


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(document):
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (document.parent / path).resolve() if path else document
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: links that resolve to nothing: {broken}"
