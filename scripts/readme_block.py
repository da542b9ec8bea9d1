"""Replace the generated block between two HTML comment markers of a README (shared by the table scripts)."""

from __future__ import annotations

import pathlib
import re


def write_block(readme: pathlib.Path, start: str, end: str, text: str) -> None:
    """Put ``text`` between the ``start`` and ``end`` markers of ``readme``, in place."""
    content = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))
