"""docs/bptt.md points at exact lines of the code; these pointers must follow the code when it moves.

Every link of the form ``name`` ([path:N](../path#LN)) must name a line that contains ``name``, and the
text and the anchor must agree on N.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"`(\w+)` \(\[[\w/.]*?:(\d+)\]\(\.\./([\w/.]+)#L(\d+)\)\)")


def _links():
    text = (ROOT / "docs" / "bptt.md").read_text()
    return [m.groups() for m in LINK.finditer(text)]


def test_the_page_has_line_pointers():
    assert len(_links()) >= 10


@pytest.mark.parametrize("name,shown,path,anchor", _links())
def test_line_pointer_names_the_right_line(name, shown, path, anchor):
    assert shown == anchor, f"{name}: text says line {shown}, link goes to {anchor}"
    lines = (ROOT / path).read_text().splitlines()
    assert name in lines[int(anchor) - 1], f"{path}:{anchor} does not contain {name}: {lines[int(anchor) - 1]!r}"
