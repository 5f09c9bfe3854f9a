"""The documentation holds together: no citation of documents outside the repository, every ``docs/<page>.md#anchor``
reference resolves to a heading, and every relative markdown link in docs/ and README.md points to a file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Design notes that once lived outside the repository; built from pieces so this file does not cite them itself.
EXTERNAL_DOCS = ("DESIGN" + ".md", "WAN_" + "SPEC", "STYLE" + ".md")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".benchmarks", "runs", "cache", "build"}
DOC_REF = re.compile(r"docs/([A-Za-z0-9_.-]+\.md)#([A-Za-z0-9_-]+)")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def repo_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else a walk that skips build and cache directories."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        files = [ROOT / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file())


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (weights, images)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Anchors of every ATX heading outside fenced code, with GitHub's -1, -2 suffixes for repeated headings."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    in_fence = False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if in_fence or m is None:
            continue
        base = github_anchor(m.group(2))
        n = counts.get(base, 0)
        counts[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_anchor_rules():
    assert github_anchor("Where we depart from the paper or its released code, and why") == (
        "where-we-depart-from-the-paper-or-its-released-code-and-why"
    )
    assert github_anchor("`text_encoder`") == "text_encoder"
    assert github_anchor("3D RoPE") == "3d-rope"
    assert anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_no_external_design_documents_cited():
    offenders = []
    for path in repo_files():
        text = read_text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(name in line for name in EXTERNAL_DOCS):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:100]}")
    assert not offenders, "cite a docs/ page instead:\n" + "\n".join(offenders)


def test_docs_anchor_references_resolve():
    pages: dict[str, set[str]] = {}
    refs, broken = 0, []
    for path in repo_files():
        text = read_text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for page, anchor in DOC_REF.findall(line):
                refs += 1
                target = ROOT / "docs" / page
                if page not in pages:
                    pages[page] = anchors(target.read_text()) if target.is_file() else set()
                if anchor not in pages[page]:
                    why = "no such page" if not target.is_file() else "no such heading"
                    broken.append(f"{path.relative_to(ROOT)}:{lineno}: docs/{page}#{anchor} ({why})")
    assert refs > 0, "found no docs/<page>.md#anchor reference at all: the scan is broken"
    assert not broken, "\n".join(broken)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    broken = []
    in_fence = False
    for lineno, line in enumerate(doc.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
        if in_fence:
            continue
        for link in MD_LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", link):
                continue  # http:, mailto: and friends
            target, _, anchor = link.partition("#")
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists():
                broken.append(f"{doc.name}:{lineno}: {link} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                broken.append(f"{doc.name}:{lineno}: {link} (no such heading)")
    assert not broken, "\n".join(broken)
