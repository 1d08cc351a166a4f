"""The split between the four distributions holds: the client is light, the server never loads torch,
and each distribution installs only what it uses."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement

HEAVY = {"torch", "celery", "redis", "kombu"}


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_client_distribution_requires_no_heavy_package():
    names = {Requirement(r).name.lower() for r in requires("gradserve") if "extra ==" not in r}
    assert names, "could not read gradserve's requirements"
    assert not names & HEAVY


def _installed_closure(distribution: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """The distributions `pip install distribution[extras]` brings in, itself included (markers for this Python)."""
    seen: set[str] = set()
    todo = [(distribution, extras)]
    while todo:
        name, wanted = todo.pop()
        if name in seen and not wanted:
            continue
        seen.add(name)
        for line in requires(name) or ():
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            todo.append((req.name.lower().replace("_", "-"), frozenset(req.extras)))
    return seen


def test_each_distribution_installs_only_what_it_uses():
    server = _installed_closure("gradserve-server")
    worker = _installed_closure("gradserve-worker")
    assert {"gradserve", "gradserve-store", "grpcio-health-checking", "redis"} <= server
    assert {"gradserve", "gradserve-store", "torch", "celery"} <= worker
    # The CLI's terminal library stays out of the images that have no terminal.
    assert "rich" not in server | worker
    assert "rich" in _installed_closure("gradserve", frozenset({"cli"}))
    # A worker reaches the store without installing the gRPC server, and the server never installs torch.
    assert not {"gradserve-server", "grpcio-health-checking"} & worker
    assert "torch" not in server


def test_the_command_without_the_cli_extra_names_the_extra():
    # rich blocked as if not installed: the command says which extra brings it, with no traceback.
    code = "import sys; sys.modules['rich'] = None; from gradserve.__main__ import main; sys.exit(main(['list']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip() == "error: the gradserve command needs rich, which the cli extra installs: " \
                                  "pip install 'gradserve[cli]'"


def test_importing_the_client_and_cli_loads_no_heavy_module():
    loaded = _modules_loaded_by("import gradserve, gradserve.cli; gradserve.Client")
    assert "gradserve" in loaded
    assert not loaded & HEAVY


def test_the_server_never_imports_torch():
    loaded = _modules_loaded_by("import gradserve_server.main, gradserve_server.service, gradserve_server.dev")
    assert "grpc" in loaded
    assert "torch" not in loaded


def test_the_trainer_knows_nothing_of_celery_redis_or_grpc():
    loaded = _modules_loaded_by("import gradserve_worker.trainer")
    assert "torch" in loaded
    assert not loaded & {"celery", "redis", "grpc", "gradserve_server", "gradserve_store"}


REPO = Path(__file__).resolve().parents[1]
# What `make test` and `make bench` run: nothing of it may reach outside the clone.
SELF_CONTAINED = ("tests", "bench", "Makefile", ".ci")
# Ways a path can leave the repository: the checkout's parent folder, or the shared folder beside it.
_OUTSIDE = re.compile(r"""REPO\.parent|\.parents\[\d+\]\s*/\s*["']\.\.|["']\.\./shared""")


def test_tests_and_benchmarks_read_nothing_outside_the_repository():
    offenders = []
    for top in SELF_CONTAINED:
        root = REPO / top
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and p.suffix in ("", ".py")]
        for path in files:
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if _OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "these reach outside the clone:\n" + "\n".join(offenders)


def test_the_corpus_the_suite_reads_is_in_the_repository(timemachine):
    assert (REPO / "tests" / "data" / "timemachine.txt").read_text(encoding="utf-8") == timemachine
    assert len(timemachine) > 100_000, "The Time Machine is about 170,000 characters"


PACKAGES = {"gradserve": REPO / "client" / "gradserve", "gradserve_store": REPO / "proto" / "gradserve_store",
            "gradserve_server": REPO / "server" / "gradserve_server",
            "gradserve_worker": REPO / "worker" / "gradserve_worker"}


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body (imports inside functions count too)."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "gradserve_server.dev" in graph["gradserve_server.main"], "the scan must see the modules' imports"
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


# The entry points (each reads its flags and environment once) and the settings modules they build from.
READS_ENVIRONMENT = {"client/gradserve/settings.py", "client/gradserve/cli.py", "proto/gradserve_store/settings.py",
                     "server/gradserve_server/main.py", "server/gradserve_server/dev.py",
                     "worker/gradserve_worker/main.py"}


def test_only_entry_points_and_settings_read_the_environment():
    readers = {str(path.relative_to(REPO)) for folder in PACKAGES.values() for path in folder.rglob("*.py")
               if re.search(r"\bos\.environ\b|\bgetenv\(", path.read_text())}
    assert readers <= READS_ENVIRONMENT, f"read the environment below an entry point: {sorted(readers - READS_ENVIRONMENT)}"
    assert "server/gradserve_server/main.py" in readers, "the scan must see the entry points' reads"
