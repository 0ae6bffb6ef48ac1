"""The documents' links and file references lead somewhere, and the code's citations
of them name sections that exist (run by `make check` and `make links`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (
    "README.md",
    "CONTRIBUTING.md",
    "CHANGELOG.md",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
    "bench/README.md",
    "sql/README.md",
)
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
# A relative path in backticks: it has a folder and names a file by its extension,
# or a folder by its trailing slash. Placeholders (NNNN, *, …) do not match.
_PATH = re.compile(
    r"^(?!/)[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]*"
    r"(\.(py|md|sql|toml|json|lock|txt|ya?ml|lua|sh)|/)$"
)
_PLACEHOLDER = re.compile(r"NNNN|X\.Y\.Z|<|\*")
# Written at run time, not kept in the repository (`make run`'s data directory).
_GENERATED = (".receiver/",)
_CITATION = re.compile(r"docs/([a-z_]+\.md)(?: §(\d+))?")
_SECTION = re.compile(r"^## (\d+)\. ", re.M)


def _exists(reference: str, document: Path, root: Path) -> bool:
    """A reference resolves from the repository's root or from its document's folder."""
    target = reference.split("#", 1)[0]
    return (root / target).exists() or (document.parent / target).exists()


def broken_references(document: Path, root: Path = ROOT) -> list[str]:
    """The relative links and backticked paths in one document that lead nowhere."""
    text = document.read_text()
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same document
        if not (document.parent / target.split("#", 1)[0]).exists():
            broken.append(f"link ({target})")
    for code in _CODE.findall(text):
        if not _PATH.match(code) or _PLACEHOLDER.search(code) or code.startswith(_GENERATED):
            continue
        if not _exists(code, document, root):
            broken.append(f"path `{code}`")
    return broken


@pytest.mark.parametrize("name", DOCUMENTS)
def test_every_link_and_path_in_a_document_exists(name: str) -> None:
    """Each document exists, and its relative links and `path` references resolve."""
    assert (ROOT / name).is_file(), f"{name} is missing"
    assert broken_references(ROOT / name) == []


def test_the_check_sees_a_broken_link_and_path(tmp_path: Path) -> None:
    """The check's own reading: a missing link target and a missing backticked path are
    reported, a URL, an anchor, a placeholder and an existing file are not."""
    (tmp_path / "receiver").mkdir()
    (tmp_path / "receiver" / "cli.py").write_text("")
    (tmp_path / "README.md").write_text("")
    document = tmp_path / "docs" / "guide.md"
    document.parent.mkdir()
    document.write_text(
        "[gone](nowhere.md) [up](../README.md) [site](https://example.com) [here](#top)\n"
        "`receiver/nowhere.py` `receiver/cli.py` `sql/NNNN_name.sql` `/metrics`\n"
    )
    found = broken_references(document, root=tmp_path)
    assert found == ["link (nowhere.md)", "path `receiver/nowhere.py`"]


def test_code_cites_documents_and_sections_that_exist() -> None:
    """Every `docs/NAME.md` a module cites exists, and every `docs/design.md §N` names
    one of its numbered sections."""
    sections = set(_SECTION.findall((ROOT / "docs" / "design.md").read_text()))
    wrong = []
    for source in sorted([*ROOT.glob("receiver/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        name = str(source.relative_to(ROOT))
        if source == Path(__file__):
            continue
        for document, section in _CITATION.findall(source.read_text()):
            if not (ROOT / "docs" / document).is_file():
                wrong.append(f"{name}: docs/{document}")
            elif section and (document != "design.md" or section not in sections):
                wrong.append(f"{name}: docs/{document} §{section}")
    assert wrong == []


_PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def test_the_readmes_python_examples_import_what_exists() -> None:
    """Every `from receiver… import …` line of the README's Python examples imports
    (the partner example named modules of the flat package once it had moved)."""
    blocks = _PYTHON_BLOCK.findall((ROOT / "README.md").read_text())
    imports = [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if re.match(r"\s*(from receiver[\w.]* import |import receiver)", line)
    ]
    assert imports
    for line in imports:
        exec(line, {})  # noqa: S102 - our own README's import lines, nothing else


def _layout_entries() -> dict[str, str]:
    """The README "Layout" map's entries under `receiver/`, by their first word (a
    subpackage `db/`, or `-` for the package's top level), each with its text."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Layout\n") :]
    start = section.index("```\nreceiver/\n") + len("```\nreceiver/\n")
    block = section[start : section.index("\nbench/", start)]
    entries: dict[str, str] = {}
    current = "-"
    for line in block.splitlines():
        match = re.match(r"^  (\w+)/\s", line)
        current = match.group(1) if match else current if line.startswith("   ") else "-"
        entries[current] = entries.get(current, "") + line + "\n"
    return entries


def test_the_readme_layout_names_every_module_and_only_those() -> None:
    """README's "Layout" map names every module of `receiver/` with code in it (empty
    package markers aside) under its subpackage, and nothing that is not there."""
    entries = _layout_entries()
    named = {
        (package, name)
        for package, text in entries.items()
        for name in re.findall(r"\b(?<!\.)(\w+\.(?:py|sql|md)|__init__)\b", text)
    }
    files = set()
    for path in (ROOT / "receiver").rglob("*"):
        if path.suffix not in {".py", ".sql", ".md"} or path.stat().st_size == 0:
            continue
        if re.match(r"\d{4}_", path.name):
            continue  # migrations: `NNNN_name.sql` names them all
        parts = path.relative_to(ROOT / "receiver").parts
        package = parts[0] if len(parts) > 1 else "-"
        name = "__init__" if path.name == "__init__.py" else path.name
        files.add((package, name))
    assert sorted(files - named) == []
    assert sorted(named - files - {("db", "NNNN_name.sql")}) == []
