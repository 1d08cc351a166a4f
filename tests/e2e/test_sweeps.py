"""Sweeps through the real stack: members are jobs, submitted whole or not at all, followed together, cancelled together."""

from __future__ import annotations

import itertools

import pytest

import gradserve
from gradserve.v1 import jobs_pb2
from gradserve_store import store

BASE = dict(dataset="builtin:adding", model="rnn", hidden_size=8, batch_size=4, seq_len=8, max_steps=20,
            log_every=5, eval_every=10, checkpoint_every=10, probe_every=10)


def _kinds_by_job(events) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for e in events:
        out.setdefault(e.job_id, []).append(e.cursor)
    return out


def test_a_grid_trains_every_member_as_a_job_and_names_the_best(stack):
    with stack.client() as c:
        sweep = c.submit_sweep(base=BASE, grid={"lr": [0.05, 1], "seed": [1, 2]}, name="adding lr", tags={"study": "grid"})
        assert [m for m in sweep.values] == [{"lr": "0.05", "seed": "1"}, {"lr": "0.05", "seed": "2"},
                                              {"lr": "1", "seed": "1"}, {"lr": "1", "seed": "2"}]
        assert {j.state for j in sweep.jobs} <= {"QUEUED", "RUNNING"}
        sweep.wait(timeout=240)
        assert [j.state for j in sweep.jobs] == ["SUCCEEDED"] * 4, stack.logs()
        for job, values in zip(sweep.jobs, sweep.values):
            assert job.spec.lr == float(values["lr"]) and job.spec.seed == int(values["seed"])
            assert job.spec.hidden_size == 8 and job.info.sweep == sweep.id and job.tags == {"study": "grid"}
            assert job.name == f"adding lr lr={values['lr']} seed={values['seed']}"
        rows = sweep.table()
        best = min(rows, key=lambda r: r["val_loss"])
        assert sweep.info.best_job_id == best["job_id"] and sweep.info.best_val_loss == best["val_loss"]
        assert all(r["step"] == 20 and r["val_loss"] is not None for r in rows)
        assert (sweep.info.succeeded, sweep.info.queued, sweep.info.running) == (4, 0, 0)
        assert [j.id for j in c.list_jobs(sweep=sweep.id)] == [j.id for j in sweep.jobs][::-1]

        # Merged, each member's events in its own order, every one once, ending when all have ended.
        alone = {j.id: [e.cursor for e in j.events()] for j in sweep.jobs}
        assert _kinds_by_job(sweep.events()) == alone
        # Stop part-way, then resume from the last cursor seen of each member.
        first, seen = [], {}
        for e in itertools.islice(sweep.events(), sum(map(len, alone.values())) // 2):
            first.append(e)
            seen[e.job_id] = e.cursor
        rest = list(sweep.events(cursors=seen))
        assert _kinds_by_job(first + rest) == alone

        listed = c.list_sweeps()
        assert listed[0].id == sweep.id and listed[0].succeeded == 4 and not listed[0].members[0].job.id


def test_explicit_members_follow_the_grid(stack):
    with stack.client() as c:
        sweep = c.submit_sweep(base={**BASE, "max_steps": 5}, grid={"truncation": ["fixed"]},
                               members=[{"truncation": "randomized", "truncation_keep": 0.5}], early_stop="median")
        assert sweep.values == [{"truncation": "fixed"}, {"truncation": "randomized", "truncation_keep": "0.5"}]
        assert sweep.jobs[1].spec.truncation_keep == 0.5
        assert sweep.info.spec.early_stop.rule == "median"


def test_median_stopping_ends_a_member_that_falls_behind_with_its_checkpoint(stack):
    with stack.client() as c:
        # The members share one worker or run side by side; either way the hopeless lr falls behind the median
        # of the others (min_peers=1: one is enough) at some evaluation, while the good ones run to the end.
        sweep = c.submit_sweep(base={**BASE, "max_steps": 60}, grid={"lr": [1, 1.5, 1e-5]}, early_stop="median",
                               min_peers=1).wait(timeout=240)
        good, better, hopeless = sweep.jobs
        assert [j.state for j in sweep.jobs] == ["SUCCEEDED"] * 3, stack.logs()
        assert hopeless.reason.startswith("stopped early at step ") and ", median " in hopeless.reason
        assert hopeless.last_step < 60 and hopeless.checkpoint_step == hopeless.last_step
        assert any(j.last_step == 60 and not j.reason for j in (good, better))


def test_successive_halving_keeps_the_best_at_each_rung(stack):
    with stack.client() as c:
        sweep = c.submit_sweep(base={**BASE, "max_steps": 80}, grid={"lr": [1, 1e-5]}, early_stop="halving",
                               min_steps=10, eta=2).wait(timeout=240)
        good, hopeless = sweep.jobs
        assert [j.state for j in sweep.jobs] == ["SUCCEEDED"] * 2, stack.logs()
        assert "not among the best 1/2 of the 2 members at the step-" in hopeless.reason, hopeless.reason
        assert hopeless.last_step < 80 and good.last_step == 80 and not good.reason


@pytest.mark.parametrize("kwargs, field, words", [
    (dict(grid={"lr": [0.5, 0]}), "spec.axes[lr]", "value '0': must be in (0, 100], got 0"),
    (dict(grid={"num_steps": ["ten"]}), "spec.axes[num_steps]", "value 'ten': expected an integer"),
    (dict(grid={"learning_rate": [1]}), "spec.axes[learning_rate]", "is not a job spec field"),
    (dict(grid={"lr": list(range(1, 18)), "seed": list(range(16))}), "spec.axes", "272 members; at most 256"),
    (dict(members=[{"model": "transformer"}]), "spec.members[0].model", "value 'transformer'"),
    (dict(grid={"lr": [1]}, early_stop="patience"), "spec.early_stop.rule", "got 'patience'"),
    (dict(), "spec.axes", "at least one axis"),
    (dict(grid={"truncation": ["tbptt"], "tbptt_k2": [4, 40]}), "spec.axes[tbptt_k2]", "value '4'"),
])
def test_a_bad_sweep_is_refused_whole_naming_the_axis_and_value(idle_stack, kwargs, field, words):
    with idle_stack.client() as c:
        before = len(c.list_jobs(limit=1000))
        with pytest.raises(gradserve.InvalidArgument) as e:
            c.submit_sweep(base={**BASE, "tbptt_k1": 8}, **kwargs)
        assert field in [f for f, _ in e.value.violations], e.value.violations
        assert any(words in reason for f, reason in e.value.violations if f == field), e.value.violations
        assert len(c.list_jobs(limit=1000)) == before, "a refused sweep left jobs behind"


def test_cancelling_a_sweep_cancels_every_member(idle_stack):
    with idle_stack.client() as c:
        sweep = c.submit_sweep(base=BASE, grid={"lr": [0.1, 0.2, 0.3]})
        assert [j.state for j in sweep.jobs] == ["QUEUED"] * 3
        assert all(j.info.waiting for j in sweep.jobs), "a queued member says why it waits"
        sweep.cancel()
        assert [j.state for j in sweep.jobs] == ["CANCELLED"] * 3 and sweep.done
        assert sweep.info.cancelled == 3
        with pytest.raises(gradserve.NotFound, match=r"^sweep sweep-0000000000000000 not found \(`gradserve sweeps` "
                                                     r"lists yours\)$"):
            c.get_sweep("sweep-0000000000000000")


def test_sweeps_are_listed_newest_first_a_page_at_a_time(idle_stack):
    with idle_stack.client() as c:
        made = [c.submit_sweep(base=BASE, grid={"lr": [0.1]}, name=f"page {i}").id for i in range(5)]
        seen, token = [], ""
        while True:
            page = c.list_sweeps(limit=2, page_token=token)
            seen += [s.id for s in page if s.id in made]
            token = page.next_page_token
            if not token:
                break
        assert seen == made[::-1]
        assert all(s.queued == 1 for s in c.list_sweeps(limit=5))
        with pytest.raises(gradserve.InvalidArgument):
            c.list_sweeps(page_token="nonsense")
        with pytest.raises(gradserve.InvalidArgument):
            c.list_sweeps(limit=1001)
        assert isinstance(c.list_sweeps(limit=1)[0], jobs_pb2.Sweep)


def test_a_sweep_is_deleted_whole_once_every_member_has_ended(idle_stack):
    with idle_stack.client() as c:
        sweep = c.submit_sweep(base=BASE, grid={"lr": [0.1, 0.2]}, name="to delete")
        ids = [j.id for j in sweep.jobs]
        with pytest.raises(gradserve.FailedPrecondition,
                           match=rf"^sweep {sweep.id} has 2 member\(s\) QUEUED or RUNNING \({ids[0]}, {ids[1]}\): .*"
                                 rf"cancel it first \(`gradserve cancel {sweep.id}`\)$"):
            sweep.delete()
        assert [j.id for j in c.get_sweep(sweep.id).jobs] == ids, "a refused delete deletes nothing"
        sweep.cancel()
        # Held-out losses as early stopping records them, which go with the sweep.
        job_store = store.JobStore.from_url(idle_stack.redis_url)
        for at in ("10", "20"):
            job_store.sweep_losses(sweep.id, at, ids[0], 1.5)
        deleted = sweep.delete()
        assert [m.job_id for m in deleted.info.members] == ids and deleted.info.cancelled == 2, "the sweep as it was"
        left = [k for k in job_store.r.scan_iter(count=1000) if sweep.id.encode() in k or ids[0].encode() in k]
        assert not left, f"keys of the deleted sweep are left: {left}"
        for job_id in ids:
            with pytest.raises(gradserve.NotFound):
                c.get_job(job_id)
        with pytest.raises(gradserve.NotFound):
            c.get_sweep(sweep.id)
        assert sweep.id not in [s.id for s in c.list_sweeps(limit=1000)]
        with pytest.raises(gradserve.NotFound):
            sweep.delete()


def test_a_sweep_whose_members_are_all_deleted_is_forgotten(idle_stack):
    with idle_stack.client() as c:
        sweep = c.submit_sweep(base=BASE, grid={"lr": [0.1, 0.2]}, name="to forget")
        sweep.cancel()
        first, second = sweep.jobs
        first.delete()
        # While one member is left the sweep stays, made of what is left, and done.
        kept = c.get_sweep(sweep.id)
        assert (kept.info.cancelled, [j.id for j in kept.jobs]) == (1, [second.id]) and kept.done
        second.delete()
        with pytest.raises(gradserve.NotFound):
            c.get_sweep(sweep.id)
        assert sweep.id not in [s.id for s in c.list_sweeps(limit=1000)]
