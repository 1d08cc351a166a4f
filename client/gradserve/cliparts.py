"""What every `gradserve` command shares: exit codes, the context a command runs in, the output helpers, and the
argument types of the job spec's flags.

`gradserve.cli` builds the command line from its own commands and those of
`gradserve.sweep_cli` and `gradserve.compare`, which build on this module
rather than on `cli`, so that the three import in one direction only.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor
from rich.console import Console
from rich.text import Text

from gradserve import labels
from gradserve import spec as specs
from gradserve.client import Client
from gradserve.cmdline import command
from gradserve.errors import GradserveError, InvalidArgument, Unavailable
from gradserve.v1 import jobs_pb2

EXIT_OK = 0
EXIT_FAILED = 1  # the job FAILED, or a command could not do its work
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_CANCELLED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BY_STATE = {"SUCCEEDED": EXIT_OK, "FAILED": EXIT_FAILED, "CANCELLED": EXIT_CANCELLED}

_FLOAT_TYPES = {descriptor.FieldDescriptor.TYPE_DOUBLE, descriptor.FieldDescriptor.TYPE_FLOAT}


# Called with the server address and the connection keywords of `Client`.
ClientFactory = Callable[..., Client]


def print_json(console: Console, data) -> None:
    # `out` neither wraps nor interprets markup, so each object stays on one parseable line.
    console.out(json.dumps(data), highlight=False)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _plain(console: Console, text: str, style: str | None = None) -> None:
    # Server text (reasons, names) may hold brackets that rich would read as markup.
    console.print(Text(text, style=style or ""), soft_wrap=True)


def fit_columns(rows: Sequence[dict[str, str]], columns: Sequence[str], width: int) -> list[str]:
    """The lines of a table of `rows` in `columns`, dropping trailing columns until every line fits `width`.

    The first column is always kept. Cells are never cut short: an id must
    stay whole to be copied.
    """
    keep = list(columns)
    while True:
        widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in keep}
        if sum(widths.values()) + 2 * (len(keep) - 1) <= width or len(keep) == 1:
            break
        keep.pop()
    lines = ["  ".join(c.ljust(widths[c]) for c in keep).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in keep).rstrip() for r in rows]
    return lines


_SERVER_COMMAND = re.compile(r"`(gradserve(?:-server|-worker)?)(?=[ `])")


def print_error(console: Console, error: GradserveError, server: str, hints: Iterable[str] = ()) -> None:
    """`error: message`, then each invalid field on its own line, then what to try."""
    violations = error.violations if isinstance(error, InvalidArgument) else []
    # The server's message for invalid fields only strings the violations together; list them instead.
    headline = "invalid " + ", ".join(dict.fromkeys(f for f, _ in violations)) if violations else str(error)
    # The server names its commands as `gradserve ...`; here they are spelt as this machine runs them.
    headline = _SERVER_COMMAND.sub(lambda m: "`" + command(m[1]), headline)
    console.print(Text.assemble(("error:", "bold red"), " ", headline), soft_wrap=True)
    for field, description in violations:
        name = field.removeprefix("spec.").removeprefix("base.")
        flag = f" (--{name.replace('_', '-')})" if name in specs.BY_NAME else ""
        _plain(console, f"  {field}{flag}: {description}")
    hints = list(hints)
    if isinstance(error, Unavailable):
        hints.insert(0, f"is the server running at {server}? start a local stack with "
                        f"`{command('gradserve-server dev')}`")
    for hint in hints:
        _plain(console, f"hint: {hint}", style="dim")


@dataclass
class Context:
    args: argparse.Namespace
    client_factory: ClientFactory
    out: Console
    err: Console
    argv: Sequence[str] = ()  # the command line as given, for hints that repeat it

    def client(self) -> Client:
        a = self.args
        return self.client_factory(a.server, token=a.token, tls=a.tls, ca_file=a.ca_file, cert_file=a.cert_file,
                                   key_file=a.key_file)


def resolve_dataset(ctx: Context, client: Client, dataset: str) -> str:
    """A dataset id or built-in name as it is; a local file is uploaded first."""
    if dataset in specs.BUILTIN_DATASETS or specs.DATASET_ID.fullmatch(dataset):
        return dataset
    path = Path(dataset)
    if not path.is_file():
        raise InvalidArgument(
            f"no dataset {dataset!r}",
            violations=[("dataset", f"must be a text file, an id from `gradserve upload` (ds-...) or one of "
                                    f"{', '.join(specs.BUILTIN_DATASETS)}; {dataset!r} is none of these")],
        )
    dataset_id = client.upload_text(path)
    _plain(ctx.err, f"uploaded {path} ({human_bytes(path.stat().st_size)}) as {dataset_id}")
    return dataset_id


def _number_type(field: specs.Field) -> type:
    """int or float, as the proto declares the field, so the table need not say it again."""
    proto_type = jobs_pb2.JobSpec.DESCRIPTOR.fields_by_name[field.name].type
    return float if proto_type in _FLOAT_TYPES else int


def _spec_type(field: specs.Field, parse: type) -> Callable[[str], object]:
    """An argparse type that parses a number and checks it against the spec's range."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a number' if parse is float else 'an integer'}, got {text!r}")
        reason = field.check(value)
        if reason:
            raise argparse.ArgumentTypeError(reason)
        return value

    return convert


def _spec_help(field: specs.Field) -> str:
    parts = [field.help]
    if field.default is not None:
        parts.append(f"default {field.default:g}" if isinstance(field.default, float) else f"default {field.default}")
    if not field.choices:
        parts.append(field.allowed)
    return "; ".join(parts).replace("%", "%%")


def add_spec_flags(parser: argparse.ArgumentParser, *, changes: bool = False) -> None:
    """One flag per `spec.FIELDS` row: --hidden-size for hidden_size, and so on.

    With `changes`, an unset flag is None (the field keeps its value) instead of the field's default.
    """
    title = "changes to the job spec" if changes else "job spec (unset flags take the defaults shown)"
    group = parser.add_argument_group(title)
    for f in specs.FIELDS:
        flag = "--" + f.name.replace("_", "-")
        default = None if changes else f.default
        if f.choices:
            group.add_argument(flag, dest=f.name, default=default, choices=f.choices, help=_spec_help(f))
        elif isinstance(f.default, bool):
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction,
                               help=_spec_help(f))
        else:
            parse = _number_type(f)
            group.add_argument(flag, dest=f.name, default=default, type=_spec_type(f, parse),
                               metavar="X" if parse is float else "N", help=_spec_help(f))


def _label(rule: Callable[[str], list]) -> Callable[[str], str]:
    """An argparse type checking a name or note by gradserve.labels' rule, before anything is sent."""

    def parse(text: str) -> str:
        problems = rule(text)
        if problems:
            raise argparse.ArgumentTypeError(problems[0][1])
        return text

    return parse


def _tag(text: str) -> tuple[str, str]:
    try:
        return labels.parse_tag(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
