"""Jobs are checked against the memory budget the live workers advertise (real processes)."""

from __future__ import annotations

import pytest

import gradserve

TEXT = "the time traveller smiled round at us " * 60


def test_a_job_over_the_smallest_advertised_budget_is_refused(make_stack):
    s = make_stack("budget")
    s.start_redis()
    s.start_server()
    # Above what the training process itself takes (gradserve.spec counts it), below a large model.
    s.start_worker("tiny", env={"GRADSERVE_MEMORY_BUDGET_MB": "500"})
    with s.client() as c:
        [worker] = c.workers()
        assert worker.memory_budget_bytes == 500 * 2**20
        dataset = c.upload_bytes(TEXT)
        small = c.submit(dataset=dataset, model="rnn", hidden_size=8, batch_size=4, num_steps=10, max_steps=2)
        assert small.wait(timeout=120).state == "SUCCEEDED"
        with pytest.raises(gradserve.InvalidArgument, match="over the cpu workers' budget of 500 MiB"):
            c.submit(dataset=dataset, model="lstm", hidden_size=2048, batch_size=4, num_steps=10)
