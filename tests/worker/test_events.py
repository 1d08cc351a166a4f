"""The trainer's reports as the protobuf events of a job's stream."""

from __future__ import annotations

import pytest
from gradserve.v1 import jobs_pb2

from gradserve_worker.events import to_event
from gradserve_worker.trainer import CheckpointReady, Evaluation, Probe, StepMetrics, TrainConfig, train


def test_step_metrics_become_a_metrics_event_with_every_field():
    m = StepMetrics(step=7, epoch=1, loss=2.5, perplexity=12.2, tokens_per_sec=1000.0, lr=0.5, grad_norm=3.0,
                    clipped=True, clip_fraction=0.25, param_grad_norms={"a": 1.0, "b": 2.0}, nonfinite_grads=12,
                    skipped_steps=2)
    event = to_event(m)
    assert event.WhichOneof("kind") == "metrics"
    got = event.metrics
    assert (got.step, got.epoch, got.loss, got.perplexity, got.tokens_per_sec, got.lr, got.grad_norm) == (
        7, 1, 2.5, 12.2, 1000.0, 0.5, 3.0)
    assert got.clipped and got.clip_fraction == 0.25
    assert [(p.name, p.norm) for p in got.param_grad_norms] == [("a", 1.0), ("b", 2.0)]
    assert got.nonfinite_grads == 12 and got.skipped_steps == 2


def test_an_evaluation_becomes_an_evaluation_event():
    event = to_event(Evaluation(step=9, loss=0.1, perplexity=0.0, metric="mse", value=0.1, baseline=0.167))
    assert event.WhichOneof("kind") == "evaluation"
    assert event.evaluation == jobs_pb2.Evaluation(step=9, loss=0.1, perplexity=0.0, metric="mse", value=0.1,
                                                   baseline=0.167)


def test_a_probe_becomes_a_probe_event_with_a_profile_per_layer():
    probe = Probe(step=200, grad_through_time=[[0.1, 0.2], [0.3, 0.4]],
                  spectral_norms=[("rnn.weight_hh_l0", "i", 1.5), ("rnn.weight_hh_l0", "f", 0.9)])
    event = to_event(probe)
    assert event.WhichOneof("kind") == "probe"
    got = event.probe
    assert got.step == 200
    assert [(g.layer, list(g.norms)) for g in got.grad_through_time] == [(0, [0.1, 0.2]), (1, [0.3, 0.4])]
    assert [(s.name, s.gate, s.sigma) for s in got.spectral_norms] == [
        ("rnn.weight_hh_l0", "i", 1.5), ("rnn.weight_hh_l0", "f", 0.9)]


def test_every_report_of_a_real_run_but_checkpoints_has_an_event(timemachine):
    events = []
    config = TrainConfig(model="gru", hidden_size=8, batch_size=4, num_steps=8, preprocess="d2l", max_steps=4,
                         log_every=2, probe_every=2, eval_every=2, val_fraction=0.1, device="cpu")
    train(config, timemachine[:3000], events.append)
    kinds = [to_event(e).WhichOneof("kind") for e in events if not isinstance(e, CheckpointReady)]
    assert kinds == ["metrics", "probe", "evaluation"] * 2


def test_a_checkpoint_has_no_event():
    with pytest.raises(TypeError, match="no event for a CheckpointReady"):
        to_event(CheckpointReady(step=1, data=b""))
