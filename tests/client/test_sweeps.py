"""The rules of a sweep that need no server: values read by the field's type, members in order, early stopping."""

from __future__ import annotations

import pytest

from gradserve import sweeps
from gradserve.v1 import jobs_pb2


def test_values_are_read_by_the_fields_type():
    assert sweeps.parse("lr", "0.5") == 0.5
    assert sweeps.parse("num_steps", "35") == 35
    assert sweeps.parse("truncation", "randomized") == "randomized"
    assert sweeps.parse("eos", "TRUE") is True and sweeps.parse("tie_weights", "0") is False
    for name, text, words in (("num_steps", "3.5", "expected an integer"), ("lr", "fast", "expected a number"),
                              ("truncation", "random", "must be one of fixed"), ("eos", "maybe", "true or false"),
                              ("hidden", "8", "not a job spec field")):
        with pytest.raises(ValueError, match=words):
            sweeps.parse(name, text)


def test_members_are_the_grid_in_order_then_the_explicit_ones():
    spec = jobs_pb2.SweepSpec(axes=[jobs_pb2.SweepAxis(field="lr", values=["1", "2"]),
                                    jobs_pb2.SweepAxis(field="num_steps", values=["5", "10", "20"])],
                              members=[jobs_pb2.SweepMember(values={"lr": "3"})])
    members = sweeps.members(spec)
    assert sweeps.member_count(spec) == len(members) == 7
    assert members[:4] == [{"lr": "1", "num_steps": "5"}, {"lr": "1", "num_steps": "10"},
                           {"lr": "1", "num_steps": "20"}, {"lr": "2", "num_steps": "5"}]
    assert members[-1] == {"lr": "3"}
    full = sweeps.member_spec(jobs_pb2.JobSpec(dataset="builtin:copy", model="gru"), members[1])
    assert (full.lr, full.num_steps, full.model, full.tbptt_k1) == (1.0, 10, "gru", 10), \
        "a member's defaults are derived from its own values"


def test_a_problem_of_the_base_is_named_once_and_one_of_a_combination_names_the_values():
    spec = jobs_pb2.SweepSpec(base=jobs_pb2.JobSpec(dataset="builtin:copy", model="lstm", hidden_size=0),
                              axes=[jobs_pb2.SweepAxis(field="lr", values=["1", "2"])])
    assert [f for f, _ in sweeps.violations(spec)] == ["spec.base.hidden_size"]
    spec = jobs_pb2.SweepSpec(base=jobs_pb2.JobSpec(dataset="builtin:copy", truncation="tbptt", tbptt_k2=20),
                              axes=[jobs_pb2.SweepAxis(field="tbptt_k1", values=["10", "30"])])
    (field, reason), = sweeps.violations(spec)
    assert field == "spec.base.tbptt_k2" and reason.startswith("with tbptt_k1=30: must be at least tbptt_k1 (30)")


def test_member_names_carry_the_values_and_fit_the_name_limit():
    assert sweeps.member_name("study", {"lr": "1", "num_steps": "5"}) == "study lr=1 num_steps=5"
    assert sweeps.member_name("", {"lr": "1"}) == "lr=1"
    assert len(sweeps.member_name("x" * 99, {"lr": "1"})) == 100


def test_halving_rungs_grow_by_eta_below_the_last_step():
    assert sweeps.rungs(jobs_pb2.EarlyStop(rule="halving", eta=3), 10, 500) == [10, 30, 90, 270]
    assert sweeps.rungs(jobs_pb2.EarlyStop(rule="halving"), 100, 100) == []


def test_the_median_rule_stops_a_member_worse_than_the_others_median():
    assert sweeps.median_verdict(2.0, [1.0, 1.5, 3.0], min_peers=3) == 1.5
    assert sweeps.median_verdict(1.2, [1.0, 1.5, 3.0], min_peers=3) is None
    assert sweeps.median_verdict(9.0, [1.0, 1.5], min_peers=3) is None, "too few others to judge by"


def test_halving_keeps_the_best_third_of_those_at_the_rung():
    assert sweeps.halving_verdict(5.0, [], eta=3) is None, "the first to arrive goes on"
    assert sweeps.halving_verdict(5.0, [1.0, 2.0], eta=3) == 1.0
    assert sweeps.halving_verdict(0.5, [1.0, 2.0], eta=3) is None
    assert sweeps.halving_verdict(3.0, [1.0, 2.0, 4.0, 5.0, 6.0], eta=3) == 2.0
    assert sweeps.halving_verdict(2.0, [1.0, 3.0, 4.0, 5.0, 6.0], eta=3) is None


def test_groups_split_by_memory_slots_and_the_cpu_cap():
    from gradserve import spec as specs

    def member(lr: float, model: str = "rnn_scratch") -> jobs_pb2.JobSpec:
        return specs.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs", model=model, lr=lr))

    members = [member(0.1 * (i + 1)) for i in range(20)] + [member(1.0, "lstm")]
    small = [specs.PROCESS_BYTES + 2**20] * len(members)
    roomy = dict(member_bytes=small, budget=2**40, slots=1)
    # One group per shape, whole where nothing limits it.
    assert sweeps.groups(members, **roomy) == [list(range(20)), [20]]
    # On a CPU at most MAX_CPU_GROUP members train as one, in parts as even as their count allows.
    assert sweeps.MAX_CPU_GROUP == 8
    assert sweeps.groups(members, **roomy, on_cpu=True) == [list(range(0, 7)), list(range(7, 14)),
                                                             list(range(14, 20)), [20]]
    # Spread over the workers' slots, and within what one worker's memory holds.
    assert [len(g) for g in sweeps.groups(members, member_bytes=small, budget=2**40, slots=5)] == [4] * 5 + [1]
    tight = specs.PROCESS_BYTES + 3 * 2**20
    assert [len(g) for g in sweeps.groups(members, member_bytes=small, budget=tight, slots=1)] == [3] * 6 + [2, 1]
