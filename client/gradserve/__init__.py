"""gradserve: train recurrent sequence models on a gradserve service.

    import gradserve
    with gradserve.Client() as c:
        job = c.submit(dataset="builtin:pydocs", model="lstm", max_steps=300)
        for ev in job.events():
            print(ev)

The names below load on first use, so that the pure modules of this package
(`gradserve.spec`, `gradserve.text`), which the workers share, never pull in grpc.
"""

from importlib import import_module

_EXPORTS = {
    "DEFAULT_SERVER": "gradserve.settings",
    "TERMINAL_STATES": "gradserve.client",
    "Client": "gradserve.client",
    "Job": "gradserve.client",
    "Sweep": "gradserve.client",
    "state_name": "gradserve.client",
    "GradserveError": "gradserve.errors",
    "InvalidArgument": "gradserve.errors",
    "NotFound": "gradserve.errors",
    "FailedPrecondition": "gradserve.errors",
    "ResourceExhausted": "gradserve.errors",
    "Unavailable": "gradserve.errors",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradserve' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
