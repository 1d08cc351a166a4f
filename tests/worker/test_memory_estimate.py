"""The memory estimate submission checks (gradserve.spec.memory_estimate_bytes) against what training holds.

Resident memory depends on the allocator and is measured in bench/memory.py.
What can be counted exactly is the floor under it: the weights, their
gradients, and every tensor autograd saves for the backward pass of one
window. The estimate must stay above that floor for every model and input,
with room for the backward's own buffers.
"""

from __future__ import annotations

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
