"""The rules for what a job is called and tagged with: its name, tags and note.

The server enforces them (SubmitJob, and the same tag rules for ListJobs'
filter); the CLI checks them first, so a typo is named before anything is sent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

MAX_NAME_CHARS = 100
MAX_TAGS = 32
MAX_TAG_KEY_CHARS = 64
MAX_TAG_VALUE_CHARS = 256
MAX_NOTE_CHARS = 4096
TAG_KEY = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_TAG_KEY_CHARS}}}")


def _control(text: str, allowed: str = "") -> str | None:
    """The first control character in `text` that is not in `allowed`, or None."""
    return next((c for c in text if unicodedata.category(c) == "Cc" and c not in allowed), None)


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:80] + "...")


def name_violations(name: str, field: str = "name") -> list[tuple[str, str]]:
    if len(name) > MAX_NAME_CHARS:
        return [(field, f"must be at most {MAX_NAME_CHARS} characters, got {len(name)}: {_show(name)}")]
    if (c := _control(name)) is not None:
        return [(field, f"must have no control characters, got {c!r} in {_show(name)}")]
    return []


def tag_violations(tags: Mapping[str, str], field: str = "tags") -> list[tuple[str, str]]:
    out = []
    if len(tags) > MAX_TAGS:
        out.append((field, f"must be at most {MAX_TAGS} tags, got {len(tags)}"))
    for key, value in tags.items():
        if not TAG_KEY.fullmatch(key):
            out.append((field, f"key must be 1 to {MAX_TAG_KEY_CHARS} letters, digits or _.- characters, "
                               f"got {_show(key)}"))
        if len(value) > MAX_TAG_VALUE_CHARS:
            out.append((f"{field}[{key}]", f"must be at most {MAX_TAG_VALUE_CHARS} characters, got {len(value)}"))
        elif (c := _control(value)) is not None:
            out.append((f"{field}[{key}]", f"must have no control characters, got {c!r} in {_show(value)}"))
    return out


def note_violations(note: str, field: str = "note") -> list[tuple[str, str]]:
    if len(note) > MAX_NOTE_CHARS:
        return [(field, f"must be at most {MAX_NOTE_CHARS} characters, got {len(note)}")]
    if (c := _control(note, "\n\t")) is not None:
        return [(field, f"must have no control characters but newlines and tabs, got {c!r}")]
    return []


def violations(name: str, tags: Mapping[str, str], note: str) -> list[tuple[str, str]]:
    """Every (field, reason) that makes these labels invalid."""
    return name_violations(name) + tag_violations(tags) + note_violations(note)


def parse_tag(text: str) -> tuple[str, str]:
    """`key=value` as (key, value); raises ValueError naming what is wrong."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"must be key=value, got {text!r}")
    problems = tag_violations({key: value}, "tag")
    if problems:
        raise ValueError(problems[0][1] if problems[0][0] == "tag" else f"value {problems[0][1]}")
    return key, value
