"""The core performs no I/O and reads no clock, randomness or environment.

Checked statically: every module under core/ is parsed, and any import of an
I/O, clock or randomness module (at the top or inside a function), or a call
of a builtin that does I/O or imports by name, fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "core"

BANNED_MODULES = frozenset({
    "trio", "h11", "httpx", "sqlite3", "sqlite_utils", "socket", "ssl", "asyncio", "time", "random",
    "os", "datetime", "uuid", "secrets", "threading", "subprocess",
    # Ways around the list above, or other I/O.
    "importlib", "io", "pathlib", "shutil", "signal", "select", "selectors", "multiprocessing",
    "concurrent", "urllib.request", "http", "logging", "sys",
})
BANNED_CALLS = frozenset({"open", "__import__", "exec", "eval", "compile", "input", "print", "breakpoint"})


def violations(source: str, filename: str = "<source>") -> list[str]:
    """Every banned import or call in ``source``, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if any(".".join(parts[:i]) in BANNED_MODULES for i in range(1, len(parts) + 1)):
                found.append(f"{filename}:{node.lineno}: imports {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_CALLS:
            found.append(f"{filename}:{node.lineno}: calls {node.func.id}()")
    return found


def _core_files():
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 14, files  # the test must actually see the core
    return files


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: p.name)
def test_core_module_is_pure(path):
    assert violations(path.read_text(), path.name) == []


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "from datetime import datetime",
        "from urllib.request import urlopen",
        "from urllib import request",
        "import trio as t",
        "def f():\n    import random\n    return random.random()",
        "class C:\n    def m(self):\n        from secrets import token_bytes",
        "import importlib\nimportlib.import_module('socket')",
        "__import__('socket')",
        "x = open('/etc/passwd').read()",
        "if False:\n    import sqlite3",
        "try:\n    import h11\nexcept ImportError:\n    pass",
    ],
)
def test_the_checker_catches_impurity(source):
    assert violations(source) != []


@pytest.mark.parametrize(
    "source",
    ["import hashlib", "from .wire import encode", "from urllib.parse import urlsplit", "import cbor2",
     "from nacl.bindings import crypto_sign", "from . import backfill", "from typing import Any"],
)
def test_the_checker_allows_pure_modules(source):
    assert violations(source) == []
