"""The code cites documents a reader of the repository can open (issue 14): no design kept elsewhere.

Every ``.py`` file and the README may cite only documents that are in the repository, a section
(``docs/SAFETY.md §6.3``) only if that document has it, and the rejection matrix of docs/SAFETY.md
names only tests that exist. This file itself is not scanned: it spells the names it forbids.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAFETY = ROOT / "docs" / "SAFETY.md"
SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", "node_modules"})
# Documents kept outside the repository that code once cited by name, with or without ".md".
ELSEWHERE = re.compile(r"SAFETY-DESIGN|PVE-NOTES|STYLE\.md|DEVELOPERS\.md|HELPERS\.md")
MARKDOWN = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w.-]+\.md)\b")
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
DOC_PATH = re.compile(r"\bdocs/[\w./-]+\.md\b")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
CITED_TEST = re.compile(r"(?:(test_\w+\.py))?::(test_\w+)")


def _sources() -> Iterator[Path]:
    """Every Python file of the repository (no hidden or build directories), then the README."""
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
            continue
        if path.resolve() != Path(__file__).resolve():
            yield path
    yield ROOT / "README.md"


def _lines() -> Iterator[tuple[str, str]]:
    """(``file:line``, text) of every line the scan reads."""
    for path in _sources():
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield f"{path.relative_to(ROOT)}:{number}", text


def _exists(name: str) -> bool:
    """A cited Markdown file: a path from the repository's root, or a bare name at the root or in docs/."""
    return (ROOT / name).is_file() or ("/" not in name and (ROOT / "docs" / name).is_file())


def _sections(doc: Path) -> set[str]:
    """The numbered sections of a Markdown document (``## 6. ...``, ``### 6.3 ...``)."""
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def test_no_code_cites_a_document_kept_outside_the_repository() -> None:
    """A reader of the repository can open every document the code and the README name."""
    found = [f"{where}: {m.group(0)}" for where, text in _lines() for m in ELSEWHERE.finditer(text)]
    found += [f"{where}: {name}" for where, text in _lines() for name in MARKDOWN.findall(text) if not _exists(name)]
    assert not found, "cites a document that is not in the repository:\n" + "\n".join(found)


def test_every_section_cited_is_a_section_of_the_document_named() -> None:
    """``§N`` follows the document it is a section of, on the same line, and that document has section N."""
    wrong = []
    for where, text in _lines():
        for match in SECTION.finditer(text):
            docs = [d for d in DOC_PATH.finditer(text) if d.end() <= match.start()]
            if not docs:
                wrong.append(f"{where}: §{match.group(1)} names no document")
            elif not (ROOT / docs[-1].group(0)).is_file():
                wrong.append(f"{where}: {docs[-1].group(0)} is not in the repository")
            elif match.group(1) not in _sections(ROOT / docs[-1].group(0)):
                wrong.append(f"{where}: {docs[-1].group(0)} has no section {match.group(1)}")
    assert not wrong, "\n".join(wrong)


def _matrix_rows() -> list[tuple[str, str]]:
    """(row, last cell) of each table row in docs/SAFETY.md §12, the rejection matrix."""
    text = SAFETY.read_text(encoding="utf-8")
    matrix = text[text.index("\n## 12. "):]
    rows = [line.strip("|").split("|") for line in matrix.splitlines() if line.startswith("| ")]
    return [(cells[0].strip(), cells[-1].strip()) for cells in rows if cells[0].strip() not in ("#", "---")]


def test_the_matrix_has_its_rows() -> None:
    """Rows 1-54 are all there, each once (tests are named after them), and the lettered rows after."""
    numbered = [row for row, _ in _matrix_rows() if row.isdigit()]
    assert numbered == [str(n) for n in range(1, 55)]
    assert len(_matrix_rows()) > 54


@pytest.mark.parametrize("row,cell", _matrix_rows(), ids=[row for row, _ in _matrix_rows()])
def test_each_row_of_the_matrix_names_tests_that_exist(row: str, cell: str) -> None:
    """A row is pinned: every ``file::test`` it names is a test function defined in that file."""
    cited = CITED_TEST.findall(cell)
    assert cited, f"row {row} names no test"
    missing, current = [], ""
    for file, name in cited:
        current = file or current
        source = (ROOT / "tests" / current).read_text(encoding="utf-8") if current else ""
        if not re.search(rf"^def {name}\(", source, re.MULTILINE):
            missing.append(f"{current}::{name}")
    assert not missing, f"row {row} names tests that do not exist: {missing}"


# --- links (issue 15): every relative link of the README and docs/ resolves in the repository ---------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING_LINE = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
EXTERNAL = ("http://", "https://", "mailto:")


def _documents() -> list[Path]:
    """The README and every Markdown document in docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown document's headings (lowercase, punctuation dropped, spaces to dashes)."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in HEADING_LINE.findall(text)}


def _links() -> Iterator[tuple[str, Path, str]]:
    """(``file:line``, the document, the link target) of every link in the README and docs/."""
    for doc in _documents():
        for number, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for target in LINK.findall(text):
                yield f"{doc.relative_to(ROOT)}:{number}", doc, target


def test_every_relative_link_resolves_to_a_file_of_the_repository() -> None:
    """A link of the README or docs/ names a file (or directory) that is in the repository, and an anchor
    (``#section``) names a heading of the document it points to."""
    broken = []
    for where, doc, target in _links():
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists() or ROOT not in (resolved, *resolved.parents):
            broken.append(f"{where}: {target} is not in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{where}: {target}: {resolved.name} has no heading #{anchor}")
    assert not broken, "\n".join(broken)


def test_the_docs_cite_no_document_kept_outside_the_repository() -> None:
    """docs/*.md, like the code and the README, names only documents a reader of the repository can open."""
    found = []
    for doc in _documents()[1:]:
        for number, text in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            found += [f"{doc.name}:{number}: {m.group(0)}" for m in ELSEWHERE.finditer(text)]
            found += [f"{doc.name}:{number}: {name}" for name in MARKDOWN.findall(text) if not _exists(name)]
    assert not found, "cites a document that is not in the repository:\n" + "\n".join(found)


# --- sections cited by name (issue 15): deploy/'s comments point at headings that exist -------------------

CITED_BY_NAME = re.compile(r'(README(?:\.md)?|docs/[\w-]+\.md)[:,]?\s+((?:"[^"\n]+"(?:,\s*)?)+)')


def _shipped() -> list[Path]:
    """What ships to a node or an image and cites the README or docs/ in its comments: deploy/ and the Dockerfile."""
    return [*sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file()), ROOT / "Dockerfile"]


def test_sections_cited_by_name_in_deploy_files_are_headings_of_that_document() -> None:
    """``(README, "Approvals, step by step")`` in a unit, a config template or the Dockerfile names a heading
    the README (or the docs/ page named) has: a section renamed or removed leaves no reader at a dead end."""
    wrong = []
    for path in _shipped():
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for doc, names in CITED_BY_NAME.findall(text):
                page = ROOT / ("README.md" if doc.startswith("README") else doc)
                headings = {title.strip() for title in HEADING_LINE.findall(page.read_text(encoding="utf-8"))}
                wrong += [f"{path.relative_to(ROOT)}:{number}: {doc} has no section {name!r}"
                          for name in re.findall(r'"([^"]+)"', names) if name not in headings]
    assert not wrong, "\n".join(wrong)


def test_the_citation_pattern_finds_the_citations_it_checks() -> None:
    """The check above is not empty: deploy/ cites README sections by name."""
    found = [m for p in _shipped() for m in CITED_BY_NAME.findall(p.read_text(encoding="utf-8"))]
    assert len(found) >= 3, found
