"""The client's public surface is exactly what `gradserve.__all__` declares."""

import gradserve


def test_public_names_are_pinned():
    assert gradserve.__all__ == [
        "Client",
        "DEFAULT_SERVER",
        "FailedPrecondition",
        "GradserveError",
        "InvalidArgument",
        "Job",
        "NotFound",
        "ResourceExhausted",
        "Sweep",
        "TERMINAL_STATES",
        "Unavailable",
        "state_name",
    ]
    for name in gradserve.__all__:
        assert getattr(gradserve, name) is not None


def test_every_error_is_a_gradserve_error():
    for name in ("InvalidArgument", "NotFound", "FailedPrecondition", "ResourceExhausted", "Unavailable"):
        assert issubclass(getattr(gradserve, name), gradserve.GradserveError)
