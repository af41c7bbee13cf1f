"""The front door: every relative link in README.md and docs/*.md resolves (file and, where
given, heading), and the README stays a page a new user reads in minutes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert broken == [], f"{page.name}: broken links {broken}"


def test_readme_is_short_and_names_no_work_items() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    for page in PAGES:
        labels = re.findall(r"\b(?:issue \d+|H[1-6]\b)", page.read_text(), re.IGNORECASE)
        assert labels == [], f"{page.name}: {labels}"


def test_slug_follows_github() -> None:
    assert slug(" The relation filter") == "the-relation-filter"
    assert slug("Compare and tune (`make compare`)") == "compare-and-tune-make-compare"
