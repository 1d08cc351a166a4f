"""The spec table: defaults, derived defaults and the rules that cross fields."""

from __future__ import annotations

from gradserve import spec, text
from gradserve.v1 import jobs_pb2


def complete(**fields) -> jobs_pb2.JobSpec:
    return spec.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs", **fields))


def test_every_proto_field_but_dataset_has_a_row():
    names = {f.name for f in jobs_pb2.JobSpec.DESCRIPTOR.fields}
    assert names - {"dataset"} == set(spec.BY_NAME)


def test_complete_fills_every_field_and_keeps_what_was_set():
    full = complete(hidden_size=7, clip_norm=0.0, seed=0)
    for f in spec.FIELDS:
        if not f.choices:
            assert full.HasField(f.name), f.name
    assert full.hidden_size == 7 and full.clip_norm == 0.0
    assert full.model == "lstm" and full.tokenization == "char"
    assert spec.violations(full) == []


def test_derived_defaults_follow_the_fields_they_depend_on():
    assert complete().lr == 1.0
    assert complete(optimizer="adam").lr == 0.001
    assert complete(optimizer="adamw", lr=0.5).lr == 0.5
    tbptt = complete(num_steps=20)
    assert (tbptt.tbptt_k1, tbptt.tbptt_k2) == (20, 40)
    assert complete(num_steps=20, tbptt_k1=5).tbptt_k2 == 10


def test_defaults_never_make_a_spec_invalid():
    # The window's whole range is allowed: tbptt's derived k2 (2 x k1) must not step outside its own range.
    for truncation in ("fixed", "full", "randomized", "tbptt"):
        for num_steps in (1, 5000, 5001, 6000, 10_000):
            full = complete(truncation=truncation, num_steps=num_steps)
            assert spec.violations(full) == [], (truncation, num_steps)
    assert complete(truncation="tbptt", num_steps=6000).tbptt_k2 == 10_000


def test_tbptt_fields_only_bind_under_tbptt():
    assert spec.violations(complete(truncation="fixed", tbptt_k1=10, tbptt_k2=5)) == []


def test_cross_field_rules():
    assert ("num_layers", "must be 1 for model rnn_scratch, got 2") in spec.violations(
        complete(model="rnn_scratch", num_layers=2)
    )
    assert [f for f, _ in spec.violations(complete(model="gru", nonlinearity="relu"))] == ["nonlinearity"]
    assert [f for f, _ in spec.violations(complete(truncation="tbptt", tbptt_k1=10, tbptt_k2=5))] == ["tbptt_k2"]


def test_min_tokens_covers_the_random_offset_and_the_shifted_targets():
    assert spec.min_tokens(batch_size=32, num_steps=35) == 35 * 33


def test_text_stats_counts_tokens_and_vocabulary_per_tokenization():
    stats = text.text_stats("The Time, the time!")
    assert stats["tokens:char:none"] == 19 and stats["tokens:char:d2l"] == len("the time the time ")
    assert stats["vocab:char:d2l"] == len(set("the time"))
    assert stats["tokens:word:none"] == 4 and stats["vocab:word:none"] == 4
    assert stats["tokens:word:d2l"] == 4 and stats["vocab:word:d2l"] == 2


def test_the_memory_estimate_grows_with_the_window_and_the_optimizer_state():
    sgd = complete(model="lstm", hidden_size=256)
    adam = complete(model="lstm", hidden_size=256, optimizer="adam")
    assert spec.memory_estimate_bytes(sgd, 28, 70) > spec.memory_estimate_bytes(sgd, 28, 35)
    assert spec.memory_estimate_bytes(adam, 28, 35) > spec.memory_estimate_bytes(sgd, 28, 35)
    assert spec.backprop_window(complete(num_steps=35), 1000) == 35
    assert spec.backprop_window(complete(truncation="full"), 1000) == 1000
    assert spec.backprop_window(complete(truncation="tbptt", num_steps=10), 1000) == 20


def test_rederivable_unsets_only_the_derived_fields_that_hold_their_derived_value():
    full = spec.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs", num_steps=20, tbptt_k2=100))
    loose = spec.rederivable(full)
    assert not loose.HasField("lr") and not loose.HasField("tbptt_k1")
    assert loose.tbptt_k2 == 100 and loose.num_steps == 20
    assert spec.complete(loose) == full
    chosen = spec.rederivable(spec.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs", lr=0.5)))
    assert chosen.lr == 0.5
