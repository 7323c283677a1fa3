"""The repository stands alone: no file cites a document it does not ship (the developers' notes live outside it),
and every relative link in README.md and docs/ points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".git", ".venv", "out", "__pycache__", ".pytest_cache", ".ruff_cache", "build"}
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh"}
NOT_SHIPPED = re.compile(r"\b(METHOD|DESIGN|PITFALLS|STYLE)\.md\b|\.\./shared\b|\bseeds/0\d\d_")


def _files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        if any(part in SKIP or part.endswith(".egg-info") for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and (path.suffix in TEXT or path.name in {"Makefile"}):
            out.append(path)
    return sorted(out)


def test_no_file_cites_a_document_the_repository_lacks():
    cited = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _files() if p != Path(__file__)
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if NOT_SHIPPED.search(line)]  # fmt: skip
    assert not cited, "\n".join(cited)


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_exists(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text())
    missing = [x for x in links if "://" not in x and not (doc.parent / x).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"
