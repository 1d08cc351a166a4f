"""Every command a user can type answers --help and --version, and a bad command line in one short error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# (console script, arguments before the flag, the distribution whose version it reports)
COMMANDS = [
    ("gradserve", [], "gradserve"),
    ("gradserve-server", [], "gradserve-server"),
    ("gradserve-server", ["dev"], "gradserve-server"),
    ("gradserve-server", ["hash-token"], "gradserve-server"),
    ("gradserve-worker", [], "gradserve-worker"),
]
# Every subcommand of the CLI too: each builds its own parser and help text.
CLI_COMMANDS = ["upload", "submit", "watch", "status", "list", "cancel", "download", "generate", "plot", "workers",
                "sweep", "sweeps", "compare"]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script, prefix, distribution", COMMANDS)
def test_help_and_version(script, prefix, distribution):
    shown = _run(script, *prefix, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage:") and "Traceback" not in shown.stderr
    version = _run(script, *prefix, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith(f"{distribution} ")


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_every_cli_command_has_help(command):
    shown = _run("gradserve", command, "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage:"), shown.stderr


@pytest.mark.parametrize("script, prefix, _", COMMANDS)
def test_a_bad_flag_is_one_error_line_and_a_pointer_to_help(script, prefix, _):
    done = _run(script, *prefix, "--no-such-flag")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and " error: " in lines[0], done.stderr
    assert lines[1].startswith("see `") and lines[1].endswith(" --help`")
