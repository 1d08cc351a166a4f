"""gradserve.truncation: the window a gradient's decay rate suggests, and the words for it."""

from __future__ import annotations

import math

import pytest

from gradserve.truncation import LONGEST_WINDOW, advice_line, advise


@pytest.mark.parametrize("rho, tolerance, suggested", [(0.5, 0.01, 7), (0.9, 0.01, 44), (0.9, 0.1, 22),
                                                       (0.99, 0.01, 459)])
def test_the_suggested_window_is_the_shortest_that_cuts_off_at_most_the_tolerance(rho, tolerance, suggested):
    advice = advise(math.log(rho), 10, tolerance)
    assert advice.suggested == suggested
    assert rho ** suggested <= tolerance < rho ** (suggested - 1)
    assert advice.half_life == pytest.approx(math.log(0.5) / math.log(rho))


def test_the_warning_says_how_much_gradient_is_left_at_the_windows_start():
    advice = advise(math.log(0.9), 12, 0.01)
    assert advice.start_fraction == pytest.approx(0.9 ** 11)
    assert advice.warning == ("the gradient at the window's start is still 31% of its end: "
                              "a longer num_steps may learn longer dependencies")
    assert advise(math.log(0.9), 44, 0.01).warning == ""
    assert "a longer tbptt_k2" in advise(math.log(0.9), 12, 0.01, "tbptt_k2").warning


def test_a_gradient_that_does_not_decay_asks_for_the_longest_window():
    advice = advise(0.02, 35, 0.01)
    assert advice.half_life == math.inf and advice.suggested == LONGEST_WINDOW
    assert advice.warning.startswith("the gradient at the window's start is still 197% of its end")
    assert advice_line(advice.half_life, advice.suggested, "") == "gradient no decay, suggested window 10000 steps"
