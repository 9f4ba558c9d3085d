"""docs/bptt.md points into the code by symbol (function and kernel names), never by line number: line
numbers drifted with every change. Every link of the form ``name`` ([text](../path)) must name a symbol
that the linked file contains, and no line-number pointer may come back.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "bptt.md"
LINK = re.compile(r"`(\w+)` \(\[[\w/.]*?\]\(\.\./([\w/.]+)\)\)")
LINE_POINTER = re.compile(r"\bline \d+|\blines \d+|\.(?:py|cpp|cu|cuh|h):\d+|#L\d+")


def _links():
    return [m.groups() for m in LINK.finditer(PAGE.read_text())]


def test_the_page_points_at_symbols():
    assert len(_links()) >= 10


def test_no_line_number_pointers():
    found = [line for line in PAGE.read_text().splitlines() if LINE_POINTER.search(line)]
    assert not found, f"line-number pointers drift; name the symbol instead: {found}"


@pytest.mark.parametrize("name,path", _links())
def test_symbol_pointer_names_a_symbol_of_the_file(name, path):
    text = (ROOT / path).read_text()
    assert re.search(rf"\b{re.escape(name)}\b", text), f"{path} does not contain {name}"
