"""Why a QUEUED job waits, from the live workers' advertisements (gradserve_server.service.waiting_reason)."""

from __future__ import annotations

from gradserve.v1 import jobs_pb2

from gradserve_server.service import waiting_reason


def test_a_worker_is_busy_only_once_it_runs_as_many_jobs_as_its_concurrency():
    worker = jobs_pb2.Worker(name="g@host", queues=["gpu"], job_id="job-a", job_ids=["job-a"], concurrency=2)
    assert waiting_reason("gpu", [worker]) == ""
    worker.job_ids.append("job-b")
    assert waiting_reason("gpu", [worker]).startswith("the one worker of the gpu queue is busy")


def test_a_worker_that_does_not_say_its_concurrency_runs_one_job():
    worker = jobs_pb2.Worker(name="c@host", queues=["cpu"])
    assert waiting_reason("cpu", [worker]) == ""
    worker.job_ids.append("job-a")
    assert "busy" in waiting_reason("cpu", [worker])
