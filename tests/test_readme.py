"""The README's support table is the tests' family list, every row measured exact."""

from __future__ import annotations

import pathlib
import re
import sys

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


def test_recipe_table_matches_the_shipped_recipes():
    import importlib.util

    script = README.parent / "scripts" / "recipe_table.py"
    spec = importlib.util.spec_from_file_location("recipe_table", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(script.parent))
    block = re.search(r"<!-- recipe-table:start -->\n(.*?)\n<!-- recipe-table:end -->", README.read_text(), re.S)
    assert block.group(1) == module.table(), "run `make table` to regenerate the README's recipe table"
