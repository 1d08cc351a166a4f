"""The trainer's reports as protobuf events: the one place that maps one onto the other."""

from __future__ import annotations

from gradserve.v1 import jobs_pb2

from gradserve_worker.trainer import Evaluation, Probe, StepMetrics, WindowChange


def to_event(report) -> jobs_pb2.Event:
    """The stream event for one of the trainer's reports (all but CheckpointReady, which is stored apart)."""
    if isinstance(report, StepMetrics):
        return jobs_pb2.Event(
            metrics=jobs_pb2.Metrics(
                step=report.step,
                epoch=report.epoch,
                loss=report.loss,
                perplexity=report.perplexity,
                tokens_per_sec=report.tokens_per_sec,
                lr=report.lr,
                grad_norm=report.grad_norm,
                clipped=report.clipped,
                clip_fraction=report.clip_fraction,
                param_grad_norms=[
                    jobs_pb2.ParamGradNorm(name=k, norm=v) for k, v in report.param_grad_norms.items()
                ],
                nonfinite_grads=report.nonfinite_grads,
                skipped_steps=report.skipped_steps,
                tokens=report.tokens,
                seconds=report.seconds,
                step_path=report.step_path,
                step_path_reason=report.step_path_reason,
            )
        )
    if isinstance(report, Evaluation):
        return jobs_pb2.Event(
            evaluation=jobs_pb2.Evaluation(
                step=report.step,
                loss=report.loss,
                perplexity=report.perplexity,
                metric=report.metric,
                value=report.value,
                baseline=report.baseline,
            )
        )
    if isinstance(report, Probe):
        advice = report.advice
        fit = {} if advice is None else dict(decay_rate=advice.rate, half_life=advice.half_life,
                                             suggested_window=advice.suggested,
                                             start_fraction=advice.start_fraction, warning=advice.warning)
        return jobs_pb2.Event(
            probe=jobs_pb2.Probe(
                step=report.step,
                grad_through_time=[
                    jobs_pb2.GradProfile(layer=layer, norms=norms)
                    for layer, norms in enumerate(report.grad_through_time)
                ],
                spectral_norms=[
                    jobs_pb2.SpectralNorm(name=name, gate=gate, sigma=sigma)
                    for name, gate, sigma in report.spectral_norms
                ],
                **fit,
            )
        )
    if isinstance(report, WindowChange):
        return jobs_pb2.Event(
            window_change=jobs_pb2.WindowChange(step=report.step, from_window=report.from_window,
                                                to_window=report.to_window, suggested=report.suggested)
        )
    raise TypeError(f"no event for a {type(report).__name__}")
