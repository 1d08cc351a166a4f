"""The memory estimate submission checks (gradserve.spec.memory_estimate_bytes) against what training holds.

Resident memory depends on the allocator and is measured in bench/memory.py.
What can be counted exactly is the floor under it: the weights, their
gradients, and every tensor autograd saves for the backward pass of one
window. The estimate must stay above that floor for every model and input,
with room for the backward's own buffers. And it must hold the training
process itself as a worker runs it, a prefork child whose resident set starts
at hundreds of MiB before any job: that is measured here too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gradserve import spec as specs
from gradserve.v1 import jobs_pb2

from gradserve_worker.models import build_model

# A batch of 64: oneDNN pads small batches, which would make the per-sequence count look larger.
V, H, B, T = 40, 64, 64, 20


def _saved_bytes(model, X) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one window's loss."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(X, model.begin_state(B, "cpu"))
        loss = F.cross_entropy(logits, X.reshape(-1))
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("model, layers, embedding", [
    ("rnn_scratch", 1, 0), ("rnn", 2, 0), ("gru", 2, 0), ("lstm", 2, 0), ("lstm", 1, 16), ("gru", 1, 16),
])
def test_the_estimate_covers_weights_gradients_and_saved_activations(model, layers, embedding):
    torch.manual_seed(0)
    net = build_model(model, V, H, layers, embedding_size=embedding)
    X = torch.randint(0, V, (T, B))
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    floor = 2 * weights + _saved_bytes(net, X)

    spec = specs.complete(jobs_pb2.JobSpec(model=model, hidden_size=H, num_layers=layers, batch_size=B, num_steps=T,
                                           embedding_size=embedding))
    assert specs.parameter_count(spec, V) * 4 == weights
    estimate = specs.memory_estimate_bytes(spec, V, T)
    # A quarter more at least: the backward allocates gradient buffers besides what autograd saved.
    assert estimate >= 1.25 * floor, f"estimate {estimate} B against a floor of {floor} B"


# A worker's parent as gradserve_worker.main makes it (its imports, then warm_up_torch)
# forks a child per job, as Celery's prefork pool does; each child trains one config
# as the train task would (the runner imported, torch's threads set) and prints its
# whole peak resident set in bytes: VmHWM, not reset, the pages shared with the
# parent included, because that is what a worker's budget has to hold.
_FORKED_PEAKS = r"""
import json, os, sys, traceback
from pathlib import Path
from gradserve_worker.main import warm_up_torch

warm_up_torch()
for config in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import torch
            from gradserve_worker.runner import run_job
            torch.set_num_threads(1)
            from gradserve_worker.trainer import TrainConfig, train
            train(TrainConfig(**config), sys.argv[2], lambda event: None)
            [hwm] = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")]
            print(int(hwm.split()[1]) * 1024, flush=True)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, config
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/status").exists(),
                    reason="needs fork and Linux's /proc/self/status, as a prefork worker")
def test_the_estimate_covers_the_whole_training_process_a_worker_forks():
    from gradserve_worker.data import build_corpus

    text = "the time traveller smiled round at us. " * 40
    jobs = [dict(model="rnn", hidden_size=16, batch_size=4, num_steps=10),
            dict(model="lstm", hidden_size=64, num_layers=2, batch_size=8, num_steps=20)]
    # Three steps, a gradient probe and a checkpoint at the last, as a job has them every so often.
    configs = [dict(dataset="test", max_steps=3, log_every=1, probe_every=3, checkpoint_every=3, val_fraction=0.0,
                    **job) for job in jobs]
    out = subprocess.run([sys.executable, "-c", _FORKED_PEAKS, json.dumps(configs), text],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    peaks = [int(line) for line in out.stdout.split()]
    assert len(peaks) == len(jobs), out.stdout
    for job, peak in zip(jobs, peaks):
        spec = specs.complete(jobs_pb2.JobSpec(**job))
        vocab, _ = build_corpus(text, spec.tokenization, spec.preprocess)
        estimate = specs.memory_estimate_bytes(spec, len(vocab), spec.num_steps)
        # The margin BENCHMARKS.md claims over the measured peaks: 1.2x. These models are tiny,
        # so this is the process's own memory, which the estimate must count.
        assert estimate >= 1.2 * peak, f"{job}: estimate {estimate / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"
