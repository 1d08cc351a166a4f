"""BENCHMARKS.md is written by several scripts, each owning one "## " section of it."""

from __future__ import annotations

from pathlib import Path


def write_section(out: Path, heading: str, section: str) -> None:
    """Replace the section of `out` that starts with `heading` (up to the next "## " heading), or append it."""
    existing = out.read_text(encoding="utf-8") if out.exists() else ""
    if heading in existing:
        before, rest = existing.split(heading, 1)
        after = rest.split("\n## ", 1)[1] if "\n## " in rest else None
        text = before.rstrip("\n") + "\n\n" + section + ("\n## " + after if after is not None else "")
    else:
        text = (existing.rstrip("\n") + "\n\n" if existing.strip() else "") + section
    out.write_text(text.lstrip("\n"), encoding="utf-8")
