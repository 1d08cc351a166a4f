"""What a sweep is: a base spec, axes whose cartesian product gives the members, explicit members, and early stopping.

Values are text, as a command line writes them ("0.5", "35", "randomized",
"true"), and are read by the type the proto gives the field. The server
validates a sweep with `violations` before it records anything; the client
and the CLI use the same rules to name a mistake before sending it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Mapping

from google.protobuf.descriptor import FieldDescriptor

from gradserve import labels
from gradserve import spec as specs
from gradserve.v1 import jobs_pb2

MAX_MEMBERS = 256
RULES = ("median", "halving")
DEFAULT_MIN_PEERS = 3
DEFAULT_ETA = 3
MAX_ETA = 10
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_FLOATS = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)
_INTS = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
         FieldDescriptor.CPPTYPE_UINT64)


# The fields in which members that train as one batched model may differ: values, never a tensor's shape or the
# data a step sees. Members that agree on every other field form a group (group_key).
MEMBER_VALUES = frozenset({
    "lr", "clip_norm", "weight_decay", "optimizer", "schedule", "lr_step_every", "lr_gamma", "min_lr",
    "dropout", "embedding_dropout", "truncation_keep", "init", "init_range", "max_dependency",
    "on_nonfinite", "truncation_tolerance",
    "max_steps", "log_every", "checkpoint_every", "eval_every", "probe_every",
})


def group_key(spec: jobs_pb2.JobSpec) -> tuple | None:
    """What members of one batched group share, for a complete spec: every field outside MEMBER_VALUES.

    None for a spec that trains alone: truncation auto moves each member's
    window on its own, and the synthetic tasks are not batched.
    """
    if spec.truncation == "auto" or spec.dataset in specs.SYNTHETIC_TASKS:
        return None
    return (("dataset", spec.dataset),
            *((f.name, getattr(spec, f.name)) for f in specs.FIELDS if f.name not in MEMBER_VALUES))


# The most members one task trains as a group on a CPU. bench/sweep.py measured rnn_scratch groups (H=512) at
# 1.08-1.34x the members one after another for 2 to 8 members and 0.93x for 32, whose activations outgrow the
# caches; on a GPU the larger groups are the faster ones.
MAX_CPU_GROUP = 8


def groups(specs_: list[jobs_pb2.JobSpec], *, member_bytes: list[int], budget: int, slots: int,
           on_cpu: bool = False) -> list[list[int]]:
    """The members (by index) that train together, in order; a member that trains alone is a group of one.

    Members with one group_key form a group, split into parts so that each
    part's memory estimate fits `budget` and the sweep spreads over up to
    `slots` tasks at once (the workers' concurrency): one batched model per
    worker slot is faster than one slot holding everything. `on_cpu` (the
    members train on CPU workers) caps a part at MAX_CPU_GROUP.
    """
    by_key: dict[tuple, list[int]] = {}
    out = []
    for i, spec in enumerate(specs_):
        key = group_key(spec)
        if key is None:
            out.append([i])
        else:
            by_key.setdefault(key, []).append(i)
    for members in by_key.values():
        # One process holds the part, so its own memory counts once (spec.shared_process_bytes).
        largest = max(member_bytes[i] for i in members) - specs.PROCESS_BYTES
        fits = max(1, (budget - specs.PROCESS_BYTES) // max(largest, 1))
        share = max(1, round(max(slots, 1) * len(members) / len(specs_)))
        size = min(fits, math.ceil(len(members) / share), MAX_CPU_GROUP if on_cpu else len(members))
        size = math.ceil(len(members) / math.ceil(len(members) / size))  # the parts as even as their count allows
        out += [members[i:i + size] for i in range(0, len(members), size)]
    return sorted(out)


def parse(name: str, text: str):
    """The value `text` stands for in JobSpec field `name`; ValueError says why it is not allowed."""
    field = specs.BY_NAME.get(name)
    if field is None:
        raise ValueError(f"is not a job spec field; one of: {', '.join(specs.BY_NAME)}")
    kind = jobs_pb2.JobSpec.DESCRIPTOR.fields_by_name[name].cpp_type
    if isinstance(field.default, bool):
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"must be true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind in _FLOATS or kind in _INTS:
        try:
            value = float(text) if kind in _FLOATS else int(text)
        except ValueError:
            raise ValueError(f"expected {'a number' if kind in _FLOATS else 'an integer'}, got {text!r}") from None
    else:
        value = text
    reason = field.check(value)
    if reason:
        raise ValueError(reason)
    return value


def members(spec: jobs_pb2.SweepSpec) -> list[dict[str, str]]:
    """Each member's values: the grid's cartesian product in order (the last axis fastest), then the explicit ones."""
    grid = []
    if spec.axes:
        names = [a.field for a in spec.axes]
        grid = [dict(zip(names, combo)) for combo in itertools.product(*(a.values for a in spec.axes))]
    return grid + [dict(m.values) for m in spec.members]


def ordered(spec: jobs_pb2.SweepSpec, values: Mapping[str, str]) -> dict[str, str]:
    """A member's values in the order people wrote them: the axes' order, then the rest by name.

    A proto map (Sweep.Member.values) keeps no order of its own.
    """
    first = [a.field for a in spec.axes if a.field in values]
    return {k: values[k] for k in first + sorted(set(values) - set(first))}


def member_count(spec: jobs_pb2.SweepSpec) -> int:
    count = 1 if spec.axes else 0
    for axis in spec.axes:
        count *= len(axis.values)
    return count + len(spec.members)


def member_spec(base: jobs_pb2.JobSpec, values: Mapping[str, str]) -> jobs_pb2.JobSpec:
    """`base` with `values` set, every other field completed with its default; the values must parse."""
    spec = jobs_pb2.JobSpec()
    spec.CopyFrom(base)
    for name, text in values.items():
        setattr(spec, name, parse(name, text))
    return specs.complete(spec)


def violations(spec: jobs_pb2.SweepSpec) -> list[tuple[str, str]]:
    """Every reason the sweep cannot run, as (field, reason); a bad value names its axis and the value."""
    problems = []
    count = member_count(spec)
    if count == 0:
        problems.append(("spec.axes", "a sweep needs at least one axis with values, or an explicit member"))
    elif count > MAX_MEMBERS:
        problems.append(("spec.axes", f"the sweep has {count} members; at most {MAX_MEMBERS} are allowed: "
                                      "use fewer values, or split it into several sweeps"))
    seen = set()
    for i, axis in enumerate(spec.axes):
        where = f"spec.axes[{axis.field or i}]"
        if axis.field in seen:
            problems.append((where, "appears twice; give each field one axis"))
        seen.add(axis.field)
        if not axis.values:
            problems.append((where, "has no values"))
        for text in sorted({t for t in axis.values if list(axis.values).count(t) > 1}):
            problems.append((where, f"has the value {text!r} twice"))
        for text in axis.values:
            try:
                parse(axis.field, text)
            except ValueError as e:
                problems.append((where, f"value {text!r}: {e}"))
    for i, member in enumerate(spec.members):
        if not member.values:
            problems.append((f"spec.members[{i}]", "sets no field; give it at least one"))
        for name, text in sorted(member.values.items()):
            try:
                parse(name, text)
            except ValueError as e:
                problems.append((f"spec.members[{i}].{name}", f"value {text!r}: {e}"))
    problems += _early_stop_violations(spec.early_stop)
    if problems or count > MAX_MEMBERS:
        return problems
    # Every member as a job: a problem in a field the member sets names the axis (or the member) and the
    # value; one every member has comes of the base and is named once; any other names the member's values.
    grid = count - len(spec.members)
    per_member, shared = [], None
    for i, values in enumerate(members(spec)):
        found = []
        for field, reason in specs.violations(member_spec(spec.base, values)):
            if field in values:
                where = f"spec.axes[{field}]" if i < grid else f"spec.members[{i - grid}].{field}"
                found.append(((where, f"value {values[field]!r}: {reason}"), False))
            else:
                found.append(((f"spec.base.{field}", reason), True))
        per_member.append((values, found))
        of_base = {p for p, base in found if base}
        shared = of_base if shared is None else shared & of_base
    for values, found in per_member:
        for problem, base in found:
            if base and problem not in shared:
                shown = " ".join(f"{k}={v}" for k, v in values.items())
                problem = (problem[0], f"with {shown}: {problem[1]}")
            if problem not in problems:
                problems.append(problem)
    return problems


def _early_stop_violations(stop: jobs_pb2.EarlyStop) -> list[tuple[str, str]]:
    problems = []
    if stop.rule not in ("", *RULES):
        problems.append(("spec.early_stop.rule", f"must be one of {', '.join(RULES)} (or empty for none), "
                                                 f"got {stop.rule!r}"))
    if stop.eta and not 2 <= stop.eta <= MAX_ETA:
        problems.append(("spec.early_stop.eta", f"must be in [2, {MAX_ETA}] (0 for {DEFAULT_ETA}), got {stop.eta}"))
    if stop.min_peers > MAX_MEMBERS:
        problems.append(("spec.early_stop.min_peers", f"must be in [0, {MAX_MEMBERS - 1}], got {stop.min_peers}"))
    return problems


def member_name(sweep_name: str, values: Mapping[str, str]) -> str:
    """A member's job name: the sweep's name and the member's own values, cut to the longest name allowed."""
    shown = " ".join(f"{k}={v}" for k, v in values.items())
    name = f"{sweep_name} {shown}" if sweep_name else shown
    return name[:labels.MAX_NAME_CHARS]


# ----------------------------------------------------------------- early stopping


def rungs(stop: jobs_pb2.EarlyStop, first: int, max_steps: int) -> list[int]:
    """The steps at which successive halving decides: first, first x eta, first x eta^2, ... below max_steps."""
    eta, out, step = stop.eta or DEFAULT_ETA, [], max(first, 1)
    while step < max_steps:
        out.append(step)
        step *= eta
    return out


def median_verdict(loss: float, peers: list[float], min_peers: int) -> float | None:
    """The median the member's held-out loss is worse than, or None when it goes on."""
    if len(peers) < min_peers:
        return None
    median = statistics.median(peers)
    return median if loss > median else None


def halving_verdict(loss: float, others: list[float], eta: int) -> float | None:
    """The cutoff the member's loss at a rung misses, or None when it is among the best 1/eta of all at the rung.

    Like asynchronous successive halving, a member is judged against those
    that reached the rung before it; the first to arrive always goes on.
    """
    ranked = sorted([*others, loss])
    keep = max(1, len(ranked) // eta)
    cutoff = ranked[keep - 1]
    return cutoff if loss > cutoff else None
