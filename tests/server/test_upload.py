"""What an upload costs the server (a real server process, its peak RSS read from /proc), and how many
uploads it takes at once."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc
import pytest

import gradserve
from gradserve import text
from gradserve.client import UPLOAD_CHUNK_BYTES
from gradserve.v1 import jobs_pb2, jobs_pb2_grpc
from gradserve_server import corpus
from gradserve_store import store

MIB = 2**20
# The bound under test: an upload may cost the server 3x its bytes plus this.
CONSTANT_BYTES = 64 * MIB

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="needs Linux's /proc/PID/clear_refs to reset the peak RSS")


def distinct_words(size: int, seed: int = 0) -> bytes:
    """`size` bytes of random letter words, about 6 letters each: nearly all of them distinct."""
    # Byte values below 36 become spaces (one in seven), the rest letters of both cases.
    table = bytes(32 if b < 36 else (65 + b % 26 if b % 2 else 97 + b % 26) for b in range(256))
    return random.Random(seed).randbytes(size).translate(table)


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


@pytest.fixture(scope="module")
def server(make_stack):
    """Redis and one server that takes uploads of up to 64 MiB, one at a time."""
    s = make_stack("upload")
    s.start_redis()
    s.start_server("--max-dataset-mb", "64", "--max-uploads", "1")
    job_store = store.JobStore.from_url(s.redis_url)
    # The server builds the built-in corpus when it starts: let that finish before measuring anything.
    deadline = time.monotonic() + 120
    while not job_store.builtin_dataset_id(next(iter(corpus.BUILTINS))):
        assert time.monotonic() < deadline, s.logs()
        time.sleep(0.2)
    s.job_store = job_store
    yield s
    job_store.r.close()


def test_an_upload_costs_the_server_at_most_3x_its_bytes_plus_a_constant(server):
    data = distinct_words(24 * MIB)
    pid = server.server.pid
    with server.client() as c:
        c.upload_bytes(distinct_words(MIB, seed=1), name="warm-up")  # first-call set-up is not the upload's
        before = _status_bytes(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        dataset_id = c.upload_bytes(data, name="distinct")
        rise = _status_bytes(pid, "VmHWM") - before
    assert rise <= 3 * len(data) + CONSTANT_BYTES, f"the server's peak RSS rose {rise / MIB:.0f} MiB for 24 MiB"
    # What it stored is still right: exact token counts, and a distinct-word count a little over the true one.
    words = data.split()  # ASCII letters and spaces only: the same words as str.split
    assert server.job_store.dataset_tokens(dataset_id, "char", "none") == (len(data), 27)
    tokens, vocab = server.job_store.dataset_tokens(dataset_id, "word", "none")
    distinct = len(set(words))
    assert tokens == len(words) and distinct > 10 * text.EXACT_DISTINCT_WORDS
    assert distinct <= vocab <= 1.05 * distinct


def test_a_character_cut_between_chunks_is_decoded_whole_and_a_bad_byte_is_placed_in_the_whole_upload(server):
    chunk = UPLOAD_CHUNK_BYTES
    data = ("a" * (chunk - 1) + "\u00e9 time \u20ac" + "b" * (chunk - 2) + "\U0001F600 end").encode()
    assert data[chunk - 1 : chunk + 1] == "\u00e9".encode()  # the 2-byte character spans the first cut
    with server.client() as c:
        dataset_id = c.upload_bytes(data, name="cut")
        assert server.job_store.dataset_info(dataset_id).num_chars == len(data.decode())
        with pytest.raises(gradserve.InvalidArgument, match=f"byte 0xff at offset {chunk + 5} is not"):
            c.upload_bytes(b"x" * chunk + b"word \xffrest", name="bad")
        # A character left unfinished at the very end: the offset is where it starts.
        with pytest.raises(gradserve.InvalidArgument, match=f"byte 0xe2 at offset {chunk + 1} is not"):
            c.upload_bytes(b"x" * (chunk - 1) + b"yz\xe2\x82", name="truncated")


class HeldUpload:
    """An upload that sends its info and 3 MiB of chunks, then stalls until released: it holds a slot."""

    def __init__(self, stack):
        self.channel = grpc.insecure_channel(stack.address)
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.sent, self.release = threading.Event(), threading.Event()
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _requests(self):
        yield jobs_pb2.UploadDatasetRequest(info=jobs_pb2.DatasetInfo(name="held"))
        for i in range(3):
            yield jobs_pb2.UploadDatasetRequest(chunk=distinct_words(MIB, seed=10 + i))
        # Asked for more: the server has read past gRPC's flow-control window, so it is in the upload.
        self.sent.set()
        self.release.wait(60)

    def _run(self):
        try:
            self.result = self.stub.UploadDataset(self._requests(), timeout=90).id
        except grpc.RpcError as e:
            self.result = e

    def __enter__(self):
        self.thread.start()
        assert self.sent.wait(30), "the held upload never got going"
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(60)
        self.channel.close()


def test_an_upload_past_max_uploads_waits_for_a_slot(server):
    # The server runs with --max-uploads 1.
    done = {}

    def second():
        with server.client() as c:
            done["id"] = c.upload_bytes("a second upload, small", name="second")

    with HeldUpload(server) as held:
        waiting = threading.Thread(target=second, daemon=True)
        waiting.start()
        waiting.join(1.5)
        assert waiting.is_alive() and not done, "the second upload went ahead while the first held the only slot"
    assert isinstance(held.result, str) and held.result.startswith("ds-"), held.result
    waiting.join(30)
    assert done.get("id", "").startswith("ds-")


def test_a_busy_refusal_says_when_to_retry_and_the_client_retries_within_its_time(server):
    # The server lets an upload wait UPLOAD_WAIT_S (10 s) for the only slot, then refuses it as busy.
    done = {}

    def second():
        with server.client(timeout=60) as c:
            started = time.monotonic()
            done["id"] = c.upload_bytes("sent again after a busy refusal", name="retried")
            done["took"] = time.monotonic() - started

    with HeldUpload(server):
        waiting = threading.Thread(target=second, daemon=True)
        waiting.start()
        time.sleep(11)  # past the server's wait: the first attempt has been refused by now
        assert waiting.is_alive() and not done
    waiting.join(30)
    assert done.get("id", "").startswith("ds-"), "the client gave up instead of retrying"
    assert done["took"] > 10


def test_an_upload_that_cannot_get_a_slot_in_time_is_refused_as_busy(server):
    with HeldUpload(server), server.client(timeout=2.0) as c:
        started = time.monotonic()
        with pytest.raises(gradserve.GradserveError) as err:
            c.upload_bytes("no room for me", name="third")
        waited = time.monotonic() - started
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    assert isinstance(err.value, gradserve.ResourceExhausted) and err.value.retry_after == 1.0
    message = str(err.value)
    assert "busy" in message and "--max-uploads 1" in message and "unavailable" not in message.lower()
    assert 1.0 <= waited < 2.0  # it waited for a slot, then said so before the caller's deadline
