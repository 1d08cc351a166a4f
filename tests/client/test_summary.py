"""A job's summary as its events add up (gradserve.summary.add): pure logic, no service."""

from __future__ import annotations

from gradserve.summary import add
from gradserve.v1 import jobs_pb2


def metrics(step: int, loss: float, clip_fraction: float, tokens: int = 100, seconds: float = 0.5) -> jobs_pb2.Event:
    return jobs_pb2.Event(metrics=jobs_pb2.Metrics(step=step, loss=loss, perplexity=2 * loss, clip_fraction=clip_fraction,
                                                   tokens=tokens, seconds=seconds))


def evaluation(step: int, loss: float, metric: str = "", value: float = 0.0) -> jobs_pb2.Event:
    return jobs_pb2.Event(evaluation=jobs_pb2.Evaluation(step=step, loss=loss, perplexity=3 * loss, metric=metric,
                                                         value=value))


def test_metrics_add_tokens_seconds_and_clipped_steps_once_each():
    s = jobs_pb2.JobSummary()
    assert add(s, metrics(10, 2.0, 0.5))
    assert add(s, metrics(30, 1.5, 0.25, tokens=200, seconds=1.5))
    # A resumed attempt recomputing step 30 (or earlier) counts nothing twice.
    assert not add(s, metrics(30, 1.4, 1.0))
    assert not add(s, metrics(20, 1.4, 1.0))
    assert (s.step, s.train_loss, s.train_perplexity) == (30, 1.5, 3.0)
    assert (s.tokens, s.train_seconds, s.tokens_per_sec) == (300, 2.0, 150.0)
    assert s.clipped_steps == 5 + 5 and s.clip_fraction == 10 / 30


def test_the_best_evaluation_is_the_lowest_loss_with_its_metric_and_step():
    s = jobs_pb2.JobSummary()
    assert add(s, evaluation(100, 0.9, "accuracy", 0.4))
    assert add(s, evaluation(200, 0.5, "accuracy", 0.8))
    assert not add(s, evaluation(300, 0.7, "accuracy", 0.7))
    assert not add(s, evaluation(400, 0.5, "accuracy", 0.8)), "a tie is not an improvement"
    assert (s.best_step, s.best_val_loss, s.best_val_perplexity, s.metric, s.metric_value) == (
        200, 0.5, 1.5, "accuracy", 0.8)


def test_other_events_leave_it_as_it_was():
    s = jobs_pb2.JobSummary()
    assert not add(s, jobs_pb2.Event(status=jobs_pb2.StatusChange(state=jobs_pb2.RUNNING)))
    assert not add(s, jobs_pb2.Event(checkpoint=jobs_pb2.CheckpointSaved(step=10)))
    assert s == jobs_pb2.JobSummary()
