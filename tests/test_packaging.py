"""The split between the three distributions holds: the client is light, the server never loads torch."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import requires

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
    assert not loaded & {"celery", "redis", "grpc", "gradserve_server"}
