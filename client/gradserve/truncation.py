"""How long a truncation window the measured gradients ask for, after Aicher, Foti & Fox 2019,
"Adaptive Truncated Backpropagation Through Time".

Each gradient probe measures, back from the last step T of the step's window,

    d_k = ‖∂(v·h_T)/∂h_{T−k}‖,   k = 0, 1, …, window − 1,

with v = ∂L/∂h_T: how much of the gradient arriving at h_T still reaches k
steps back. When every step's Jacobian shrinks it by a factor ρ, d_k = ρ^k d_0,
so log d_k is a line in k whose slope, log ρ, is the decay rate per step
(decay_rate fits it). The half-life is log ½ / log ρ steps. Truncating at K
steps drops the paths longer than K, which carry

    Σ_{k≥K} ρ^k / Σ_{k≥0} ρ^k = ρ^K

of the gradient mass; the suggested window is the smallest K with ρ^K ≤ ε
(the job's truncation_tolerance). A gradient that does not decay at all
suggests the longest window a spec allows.

Pure Python, so that the worker (which fits) and the CLI and plot (which show
the result in the same words) share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gradserve.spec import BY_NAME

LONGEST_WINDOW = BY_NAME["num_steps"].high


def decay_rate(norms: Sequence[float]) -> float | None:
    """log ρ fitted to d_0, d_1, … (`norms`, from the window's last step backwards); None below two usable points.

    Only the leading run of positive, finite norms counts: past a cut the
    gradient is exactly zero. The fit is robust: the median of the slopes of
    log d over spans of half the run, so a few odd steps (the output layer's
    kick at k = 0, an outlier token) move it little.
    """
    logs = []
    for n in norms:
        if not (n > 0 and math.isfinite(n)):
            break
        logs.append(math.log(n))
    if len(logs) < 2:
        return None
    span = len(logs) // 2
    slopes = sorted((logs[i + span] - logs[i]) / span for i in range(len(logs) - span))
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


@dataclass(frozen=True)
class Advice:
    """What a fitted decay rate says about a window of `window` steps."""

    rate: float  # log ρ per step
    half_life: float  # steps for the gradient to halve; inf when it does not decay
    suggested: int  # the shortest window that drops at most the tolerance of the gradient mass
    start_fraction: float  # the gradient at the window's first step relative to its last, ρ^(window − 1)
    warning: str  # why a longer window may help; "" when this one drops at most the tolerance


def advise(rate: float, window: int, tolerance: float, field: str = "num_steps") -> Advice:
    """The advice for a window of `window` steps whose gradient decays at `rate` (log ρ per step).

    `field` names the setting that sets the window, for the warning's words.
    """
    if rate < 0:
        half_life = math.log(0.5) / rate
        suggested = min(max(1, math.ceil(math.log(tolerance) / rate - 1e-9)), LONGEST_WINDOW)
    else:
        half_life, suggested = math.inf, LONGEST_WINDOW
    start = math.exp(min(rate * (window - 1), 50.0))
    dropped = math.exp(min(rate * window, 50.0))
    warning = ""
    if dropped > tolerance:
        warning = (f"the gradient at the window's start is still {start:.0%} of its end: "
                   f"a longer {field} may learn longer dependencies")
    return Advice(rate, half_life, suggested, start, warning)


def advice_line(half_life: float, suggested: int, warning: str) -> str:
    """The probe's advice in words, as the CLI and the plot show it."""
    life = "no decay" if math.isinf(half_life) else f"half-life {half_life:.3g} steps"
    words = f"gradient {life}, suggested window {suggested} steps"
    return f"{words}; {warning}" if warning else words
