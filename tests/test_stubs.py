"""The committed gRPC stubs are exactly what `make proto` generates from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATED = ("jobs_pb2.py", "jobs_pb2.pyi", "jobs_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    makefile = (REPO / "Makefile").read_text()
    # Run the very command the Makefile runs, writing into a scratch copy of the output tree.
    recipe = makefile.split("\nproto:", 1)[1].split("\n\n", 1)[0]
    command = " ".join(line.strip().rstrip("\\") for line in recipe.splitlines()[1:])
    assert "grpc_tools.protoc" in command, "the proto target no longer runs grpc_tools.protoc"
    out = tmp_path / "client"
    out.mkdir()
    args = command.replace("$(PY)", sys.executable).replace("--python_out=client", f"--python_out={out}")
    args = args.replace("--pyi_out=client", f"--pyi_out={out}").replace("--grpc_python_out=client", f"--grpc_python_out={out}")
    subprocess.run(args, shell=True, check=True, cwd=REPO)

    stale = [
        name for name in GENERATED
        if not filecmp.cmp(out / "gradserve" / "v1" / name, REPO / "client" / "gradserve" / "v1" / name, shallow=False)
    ]
    assert not stale, f"stubs out of date with proto/: {stale}; run `make proto` and commit the result"


def test_the_check_notices_a_changed_proto(tmp_path):
    """Guards the test above: a proto edit must change what protoc writes."""
    proto = tmp_path / "proto" / "gradserve" / "v1"
    proto.mkdir(parents=True)
    text = (REPO / "proto" / "gradserve" / "v1" / "jobs.proto").read_text()
    (proto / "jobs.proto").write_text(text.replace("string reason = 7;", "string reason = 7;\n  string extra = 99;"))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'proto'}", f"--python_out={out}",
         str(proto / "jobs.proto")],
        check=True,
    )
    assert not filecmp.cmp(out / "gradserve" / "v1" / "jobs_pb2.py", REPO / "client" / "gradserve" / "v1" / "jobs_pb2.py",
                           shallow=False)
