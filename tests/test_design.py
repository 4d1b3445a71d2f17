"""Every "§" reference in the code, tests, benchmarks and README points at a section of
docs/design.md, the design contract the code cites."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", re.M)
REFERENCE = re.compile(r"§\s?(\d+(?:\.\d+)?)(?:\s?[–-]\s?(\d+(?:\.\d+)?))?")
SOURCES = ("fastl2r", "kernels", "csrc", "benchmarks", "tests", "docs")
SUFFIXES = {".py", ".md", ".cpp", ".cu", ".cuh", ".h", ".sh"}


def cited_files():
    yield from (ROOT / name for name in ("README.md", "BENCHMARKS.md", "setup.py"))
    for folder in SOURCES:
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file())


def test_every_section_reference_resolves():
    sections = set(HEADING.findall(DESIGN.read_text()))
    assert {"1.1", "1.7", "3.3", "6", "7.4"} <= sections
    dangling = []
    for path in cited_files():
        for match in REFERENCE.finditer(path.read_text(errors="replace")):
            for number in filter(None, match.groups()):
                if number not in sections:
                    dangling.append(f"{path.relative_to(ROOT)}: §{number}")
    assert not dangling, dangling


def test_the_references_cite_this_document():
    assert "docs/design.md" in (ROOT / "README.md").read_text()
