"""The README's support table is the tests' family list, every row measured exact."""

from __future__ import annotations

import pathlib
import re

import bcosify

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_support_table_matches_family_list():
    text = README.read_text()
    block = re.search(r"<!-- support-table:start -->(.*?)<!-- support-table:end -->", text, re.S).group(1)
    rows = [line.split("|")[1:-1] for line in block.strip().splitlines()[2:]]
    listed = [(cells[1].strip(), cells[2].strip()) for cells in rows]
    expected = [(f.library, f"`{f.name}`" + (f" ({f.kwargs_text})" if f.kwargs else ""))
                for f in bcosify.list_supported()]
    assert listed == expected, "run `make table` to regenerate the README table"
    assert all(cells[5].strip() == "exact" for cells in rows)


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
