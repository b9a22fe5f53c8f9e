"""The project's own documents: every "semantics n.m" reference in code, tests and docs
resolves to a section of docs/semantics.md, and no code cites an external spec or an issue."""

from __future__ import annotations

import os
import re

import pytest
from conftest import ROOT

SEMANTICS = os.path.join(ROOT, "docs", "semantics.md")
SCANNED = ("kdfast", "csrc", "tests", "tools", "examples", "benchmarks")
TOP_FILES = ("README.md", "CONTRIBUTING.md")
SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh", ".md", ".sh")
REFERENCE = re.compile(r"\bsemantics (?:section )?(\d+(?:\.\d+)?)", re.IGNORECASE)


def scanned_files() -> list[str]:
    files = [os.path.join(ROOT, f) for f in TOP_FILES]
    for top in SCANNED:
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            files += [os.path.join(dirpath, n) for n in names if n.endswith(SUFFIXES)]
    return [f for f in files if os.path.isfile(f)]


def sections() -> set[str]:
    """Section numbers of docs/semantics.md ("## 3 ..." -> "3", "### 1.5 ..." -> "1.5")."""
    with open(SEMANTICS) as f:
        return {m.group(1) for m in re.finditer(r"^#{2,3} (\d+(?:\.\d+)?) ", f.read(), re.M)}


def test_scanner_sees_the_tree():
    # guards the tests below against a scan that silently finds nothing
    files = scanned_files()
    assert any(f.endswith(os.path.join("kdfast", "functional.py")) for f in files)
    assert any(f.endswith(".cpp") for f in files)
    assert {"0", "1.5", "3", "7"} <= sections()


def test_every_semantics_reference_resolves():
    known = sections()
    broken = []
    for path in scanned_files():
        with open(path, errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                for m in REFERENCE.finditer(line):
                    if m.group(1) not in known:
                        broken.append(f"{os.path.relpath(path, ROOT)}:{lineno}: {m.group(0)}")
    assert not broken, "references to missing sections of docs/semantics.md:\n" + "\n".join(broken)


@pytest.mark.parametrize(
    "pattern, what",
    [
        (r"\bSPEC(\.md)?\s*(section\s*)?\d", "a spec the project does not contain"),
        (r"\bissue\s*#?\d+", "an issue number (history belongs in git log)"),
    ],
)
def test_code_cites_no_external_documents(pattern, what):
    regex = re.compile(pattern, re.IGNORECASE)
    hits = []
    for path in scanned_files():
        if path.endswith(".md") or os.path.samefile(path, __file__):
            continue
        with open(path, errors="replace") as f:
            hits += [
                f"{os.path.relpath(path, ROOT)}:{i}"
                for i, line in enumerate(f, 1)
                if regex.search(line)
            ]
    assert not hits, f"code citing {what}: {hits}"


def test_named_test_files_exist():
    """Paths like tests/kernels/test_ptx.py named in code, docs and CI exist."""
    pattern = re.compile(r"\btests/[A-Za-z0-9_/]+\.py\b")
    paths = scanned_files() + [os.path.join(ROOT, ".ci", "run")]
    missing = []
    for path in paths:
        with open(path, errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                missing += [
                    f"{os.path.relpath(path, ROOT)}:{lineno}: {m.group(0)}"
                    for m in pattern.finditer(line)
                    if not os.path.isfile(os.path.join(ROOT, m.group(0)))
                ]
    assert not missing, "references to test files that do not exist:\n" + "\n".join(missing)
