"""The README and docs/: short enough to read, every relative link resolves, every results table
matches the JSON it came from, and every committed picture redraws from its JSON."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = sorted((ROOT / "bench" / "results").glob("train-*.json"))
README_MAX_LINES = 250


def _prose(text: str) -> str:
    """The Markdown outside fenced code blocks (a link inside code is code)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(path.read_text(encoding="utf-8")), flags=re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", _prose(path.read_text(encoding="utf-8")))


def test_readme_is_short_with_a_table_of_contents():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    sections = re.findall(r"^## (.+)$", _prose(text), flags=re.M)
    contents = text[:text.index("\n## ")]
    for section in sections:
        assert f"(#{_slug(section)})" in contents, f"the table of contents has no link to '{section}'"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no {path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_docs_pages_are_linked_from_the_readme():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in _links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"{page.name} is not linked from the README"


@pytest.fixture(scope="module")
def tables():
    """Each committed results JSON's table, as the command prints it."""
    from zenith_fused.train import report

    return {path.name: report.format_results(report.load_results(path)) for path in RESULTS}


def _rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]


def test_every_results_table_in_the_docs_is_its_json(tables):
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    for name, table in tables.items():
        assert name in results, (f"docs/results.md does not cite {name}: give it a section with the table that "
                                 f"`python -m zenith_fused.train.report bench/results/{name}` prints")
        for row in _rows(table):
            assert row in results, f"{name}: row not in docs/results.md: {row}"


def test_every_number_of_the_readme_results_table_is_in_a_json_table(tables):
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Results"):]
    section = section[:section.index("\n## ", 1)]
    cells = "\n".join(tables.values())
    numbers = [n for row in _rows(section)[1:] for n in re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?", row)]
    assert numbers, "no numbers found in the README's results table"
    for number in numbers:
        assert number in cells, f"README results: {number} is in no results JSON's table"


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_committed_picture_redraws_from_its_json(path, tmp_path):
    from zenith_fused.train import report

    assert path.with_suffix(".png").exists()
    drawn = report.redraw(path, tmp_path / "picture.png")
    assert drawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
