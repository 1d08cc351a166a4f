"""Stand-ins for the client's Job and Client in the CLI's unit tests: records and events held in memory."""

from __future__ import annotations

from gradserve.errors import NotFound


class FakeJob:
    """A job handle over a record and its events; `follow` says how the last events() call asked for them."""

    def __init__(self, info, events):
        self.info, self._events, self.follow = info, events, None

    @property
    def id(self):
        return self.info.id

    def events(self, cursor=None, follow=True):
        self.follow = follow
        return iter(self._events)


class FakeClient:
    """A client that knows these jobs and at most one sweep, and raises NotFound for anything else."""

    def __init__(self, jobs, sweep=None):
        self.jobs, self.sweep = {j.id: j for j in jobs}, sweep

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def get_job(self, job_id):
        if job_id not in self.jobs:
            raise NotFound(f"{job_id} not found")
        return self.jobs[job_id]

    def get_sweep(self, sweep_id):
        if self.sweep is None or sweep_id != self.sweep.info.id:
            raise NotFound(f"{sweep_id} not found")
        return self.sweep
