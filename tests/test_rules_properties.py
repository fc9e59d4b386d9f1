"""Properties of every domain's rules over random states, random device edits and random
contexts: repairs end in a valid state, a repaired state is a fixed point (no ping-pong),
and ``compensate`` on a real doc leaves exactly what ``apply_to_state`` predicts."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map

from crdt_models import constraints, record
from crdt_models.constraints import Context
from crdt_models.record import RecordState
from tests.test_rules_support import (
    DOMAINS,
    META_KEYS,
    NESTED,
    apply_changes,
    comparable,
    contexts,
    doc_of,
    edit,
    evaluate,
    field_changes,
    merge,
    model,
    put,
    repaired,
    replica,
    state,
    tampered_history,
    tampered_meta,
    transition_problems,
    violations,
)

EXAMPLES = 60 * int(os.environ.get("FIELDSYNC_TEST_SCALE", "1"))
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def keeps_history(name: str) -> bool:
    return record.HISTORY_ROOT in model(name).arrays


def server_state(name: str, data: st.DataObject, context: Context) -> RecordState:
    """A state the server could hold: a random new record (junk included), repaired."""
    keeps = keeps_history(name)
    seed = apply_changes(state(has_history=keeps), data.draw(field_changes(name), label="create"))
    seed = dataclasses.replace(
        seed,
        meta=data.draw(tampered_meta({})),
        history=data.draw(tampered_history(())) if keeps else (),
    )
    made = repaired(name, None, seed, context)
    assert violations(name, made, context) == []
    assert transition_problems(name, None, made, context) == []
    return made


@pytest.mark.parametrize("name", DOMAINS)
@PROPERTY
@given(data=st.data())
def test_repairs_end_in_a_valid_state_that_needs_no_more_repairs(
    name: str, data: st.DataObject
) -> None:
    context = data.draw(contexts(), label="context")
    before = server_state(name, data, context)
    after = apply_changes(before, data.draw(field_changes(name), label="edit"))
    after = dataclasses.replace(
        after,
        meta=data.draw(tampered_meta(before.meta), label="meta"),
        history=data.draw(tampered_history(before.history), label="history")
        if keeps_history(name)
        else (),
    )
    corrections = evaluate(name, before, after, context)
    fixed = constraints.apply_to_state(after, corrections)

    assert violations(name, fixed, context) == []
    assert transition_problems(name, before, fixed, context) == []
    assert evaluate(name, fixed, fixed, context) == []
    assert evaluate(name, fixed, fixed, data.draw(contexts(), label="any context")) == []
    json.dumps(constraints.decisions(corrections), allow_nan=False)


@pytest.mark.parametrize("name", DOMAINS)
@PROPERTY
@given(data=st.data())
def test_an_unchanged_state_is_never_corrected(name: str, data: st.DataObject) -> None:
    context = data.draw(contexts())
    s = server_state(name, data, context)
    assert evaluate(name, s, s, data.draw(contexts())) == []


HistoryOp = tuple[str, int, object]


def history_ops() -> st.SearchStrategy[list[HistoryOp]]:
    op = st.tuples(
        st.sampled_from(["delete", "insert_map", "insert_text", "insert_json", "alter"]),
        st.integers(0, 20),
        st.sampled_from(["HACK", 0, True, None]),
    )
    return st.lists(op, max_size=3)


def apply_history_ops(doc: Doc[Any], ops: list[HistoryOp]) -> None:
    array = doc.get(record.HISTORY_ROOT, type=Array)
    for kind, at, value in ops:
        size = len(array)
        if kind == "delete" and size:
            del array[at % size]
        elif kind == "alter" and size and isinstance(array[at % size], Map):
            array[at % size]["to"] = value
        elif kind == "insert_map":
            array.insert(at % (size + 1), Map({"to": value}))
        elif kind == "insert_text":
            array.insert(at % (size + 1), "junk")
        elif kind == "insert_json":
            array.insert(at % (size + 1), {"field": "level", "to": value})


@pytest.mark.parametrize("name", DOMAINS)
@PROPERTY
@given(data=st.data())
def test_compensation_on_a_doc_is_one_update_and_matches_the_pure_repair(
    name: str, data: st.DataObject
) -> None:
    context = data.draw(contexts(), label="context")
    server = doc_of(server_state(name, data, context), client_id=1000)
    before = record.read_state(server, model(name))
    device = replica(server, data.draw(st.sampled_from([5, 50_000]), label="device client id"))
    changes = data.draw(field_changes(name), label="edit")
    meta = data.draw(st.dictionaries(st.sampled_from(META_KEYS), st.sampled_from(["me", NESTED])))
    ops = data.draw(history_ops(), label="history ops")

    def device_edit(doc: Doc[Any]) -> None:
        fields = doc.get(record.FIELDS_ROOT, type=Map)
        for key, value in changes.items():
            put(fields, key, value)
        for key, value in meta.items():
            put(doc.get(record.META_ROOT, type=Map), key, value)
        apply_history_ops(doc, ops)

    done = merge(server, name, before, edit(device, device_edit), context)

    assert done.compensation_updates == (1 if done.corrections else 0)
    predicted = constraints.apply_to_state(done.after, done.corrections)
    assert comparable(done.repaired) == comparable(predicted)
    assert violations(name, done.repaired, context) == []
    assert evaluate(name, done.repaired, done.repaired, context) == []
    if done.compensation is not None:
        device.apply_update(done.compensation)
    assert comparable(record.read_state(device, model(name))) == comparable(done.repaired)
