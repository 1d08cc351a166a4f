"""What every gradserve command line shares: short usage errors, --version, and hints that run as printed.

The server and worker entry points use it too; it imports nothing beyond the
standard library.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are the one line that matters and where to read more.

    argparse's own error prints the whole usage block first, which on a
    command with thirty flags buries the line that says what was wrong.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\nsee `{command(self.prog)} --help`\n")


def add_version(parser: argparse.ArgumentParser, distribution: str) -> None:
    try:
        number = version(distribution)
    except PackageNotFoundError:
        number = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"{distribution} {number}")


def command(words: str) -> str:
    """`words` (a command and maybe arguments, like "gradserve download") as a user can type it here.

    A command not on PATH but installed beside the one running now (a
    virtualenv that is not activated, say) is named by its path, relative to
    the working directory where that is shorter.
    """
    name, _, rest = words.partition(" ")
    if shutil.which(name):
        return words
    running = sys.argv[0] if sys.argv and sys.argv[0] else ""
    sibling = os.path.join(os.path.dirname(running), name) if running else ""
    if not sibling or not os.path.isfile(sibling) or not os.access(sibling, os.X_OK):
        return words
    relative = os.path.relpath(sibling)
    path = relative if not relative.startswith("..") and len(relative) < len(sibling) else sibling
    if os.sep not in path:
        path = os.path.join(".", path)
    return f"{path} {rest}".rstrip()
