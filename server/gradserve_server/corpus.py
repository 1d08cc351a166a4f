"""Built-in corpora, made on the spot so that nothing is downloaded or shipped.

``builtin:pydocs`` is the docstrings of the Python standard library that the
server runs on: English prose about programming, about a megabyte of it. The
sources are parsed, never imported, so building it runs no library code.
The text is stored like an upload, under its content-derived id, so workers
read it from Redis like any other dataset.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

PYDOCS_MAX_CHARS = 1_000_000
# Tests, demos and vendored code hold little prose and a lot of repetition.
_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "__pycache__"}


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc


def pydocs(max_chars: int = PYDOCS_MAX_CHARS) -> str:
    """The standard library's docstrings, in a fixed order, cut to `max_chars`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        for doc in _docstrings(path):
            parts.append(doc)
            total += len(doc) + 2
            if total >= max_chars:
                return "\n\n".join(parts)[:max_chars]
    return "\n\n".join(parts)


BUILTINS = {"builtin:pydocs": pydocs}
