"""A sweep's members that share shapes and data train as one batched model on one worker, through the real stack."""

from __future__ import annotations

import pytest

from gradserve import sweeps

SMALL = dict(model="rnn_scratch", hidden_size=16, batch_size=8, num_steps=10, preprocess="d2l", max_steps=30,
             log_every=10, eval_every=10, checkpoint_every=10, probe_every=10)


def _final_losses(job) -> dict[int, float]:
    return {e.metrics.step: e.metrics.loss for e in job.events() if e.WhichOneof("kind") == "metrics"}


def test_members_that_share_shapes_train_as_one_group_and_match_themselves_alone(stack, timemachine):
    with stack.client() as c:
        dataset = c.upload_bytes(timemachine)
        sweep = c.submit_sweep(base=dict(dataset=dataset, **SMALL), grid={"lr": [0.5, 1, 2]}).wait(timeout=240)
        assert [j.state for j in sweep.jobs] == ["SUCCEEDED"] * 3, stack.logs()
        for job in sweep.jobs:
            lines = [line.message for line in job.logs()]
            assert any(m.startswith("training 3 members as one group: ") for m in lines), lines
            assert job.info.worker == sweep.jobs[0].info.worker
        # The same spec trained alone: the group changed how the steps ran, not what they computed.
        member = sweep.jobs[2]
        alone = c.submit(dataset=dataset, **{**SMALL, "lr": 2.0}).wait(timeout=120)
        assert alone.state == "SUCCEEDED"
        grouped, single = _final_losses(member), _final_losses(alone)
        assert grouped.keys() == single.keys() == {10, 20, 30}
        for step in grouped:
            assert grouped[step] == pytest.approx(single[step], rel=1e-4), step


def test_members_that_differ_in_shape_train_apart(stack, timemachine):
    with stack.client() as c:
        dataset = c.upload_bytes(timemachine)
        sweep = c.submit_sweep(base=dict(dataset=dataset, **SMALL), grid={"hidden_size": [8, 12]}).wait(timeout=240)
        assert [j.state for j in sweep.jobs] == ["SUCCEEDED"] * 2, stack.logs()
        for job in sweep.jobs:
            assert not any("as one group" in line.message for line in job.logs())


def test_a_cpu_group_larger_than_the_cap_trains_in_even_parts(stack, timemachine):
    with stack.client() as c:
        dataset = c.upload_bytes(timemachine)
        lrs = [0.1 * (i + 1) for i in range(sweeps.MAX_CPU_GROUP + 1)]
        quick = {**SMALL, "max_steps": 10, "eval_every": 10, "probe_every": 10}
        sweep = c.submit_sweep(base=dict(dataset=dataset, **quick), grid={"lr": lrs}).wait(timeout=300)
        assert [j.state for j in sweep.jobs] == ["SUCCEEDED"] * len(lrs), stack.logs()
        sizes = []
        for job in sweep.jobs:
            said = [line.message for line in job.logs() if "as one group" in line.message]
            sizes.append(int(said[0].split()[1]))
        assert sorted(sizes) == [4] * 4 + [5] * 5, "9 members on a CPU: one part of 5 and one of 4"
