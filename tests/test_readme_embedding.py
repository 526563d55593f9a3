"""The README's "Embedding the core" program runs as printed: an embedder's first paste works."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _embedding_program() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Embedding the core"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the embedding section has no python program"
    return match.group(1)


def test_the_readme_embedding_program_peers_two_servers():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_embedding_program(), "README.md", "exec"), {"__name__": "readme"})
    assert re.match(r"peered: b\.example scaiwave-fed/\d+ ed25519:\S+\n\Z", out.getvalue()), out.getvalue()
