"""A job's summary as its events add up: what the worker stores with each report, and what anyone can recompute.

    summary = jobs_pb2.JobSummary()
    for event in job.events(follow=False):
        add(summary, event)
"""

from __future__ import annotations

from gradserve.v1 import jobs_pb2


def add(summary: jobs_pb2.JobSummary, event: jobs_pb2.Event) -> bool:
    """Fold `event` into `summary`; True when it changed.

    A metrics event at or before the summary's step changes nothing: a
    resumed attempt recomputes steps its predecessor reported, and they
    count once.
    """
    kind = event.WhichOneof("kind")
    if kind == "metrics":
        m = event.metrics
        if m.step <= summary.step:
            return False
        steps = m.step - summary.step
        summary.step, summary.train_loss, summary.train_perplexity = m.step, m.loss, m.perplexity
        summary.tokens += m.tokens
        summary.train_seconds += m.seconds
        summary.tokens_per_sec = summary.tokens / summary.train_seconds if summary.train_seconds > 0 else 0.0
        summary.clipped_steps += round(m.clip_fraction * steps)
        summary.clip_fraction = summary.clipped_steps / summary.step
        return True
    if kind == "evaluation":
        e = event.evaluation
        if summary.best_step and not e.loss < summary.best_val_loss:
            return False
        summary.best_step, summary.best_val_loss, summary.best_val_perplexity = e.step, e.loss, e.perplexity
        summary.metric, summary.metric_value = e.metric, e.value
        return True
    return False
