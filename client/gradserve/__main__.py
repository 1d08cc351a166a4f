"""The `gradserve` command (also `python -m gradserve`).

The CLI draws with rich, which comes with the `cli` extra: the server and the
workers import this distribution for its stubs and spec, and have no terminal
to draw on. Without the extra, the command says how to get it instead of
printing a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

INSTALL_HINT = "pip install 'gradserve[cli]'"
EXIT_NOT_INSTALLED = 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from gradserve import cli
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "rich":
            raise
        print(f"error: the gradserve command needs rich, which the cli extra installs: {INSTALL_HINT}", file=sys.stderr)
        return EXIT_NOT_INSTALLED
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
