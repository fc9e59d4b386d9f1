"""The engine behind the domain rules: context, corrections beyond fields, compensation,
back-office edits, the meta map."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from pycrdt import Array, Doc, Map

from crdt_models import constraints, record, registry, rules_common
from crdt_models.constraints import (
    SERVER_ORIGIN,
    Context,
    Correction,
    Geofence,
    InvalidEdit,
    Origin,
    RuleSettings,
)
from crdt_models.history import protect_history
from crdt_models.record import NonScalar, RecordState
from crdt_models.schema import Rule
from tests.test_rules_support import (
    BACKOFFICE,
    DOMAINS,
    NOW,
    comparable,
    doc_of,
    edit,
    evaluate,
    merge,
    model,
    replica,
    state,
)

E1 = {"when": "w", "who": "u", "action": "create", "field": "status", "from": None, "to": "NEW"}
E2 = {**E1, "action": "change", "from": "NEW", "to": "OPEN"}


def capture(doc: Doc[Any], action: Callable[[], None]) -> list[bytes]:
    updates: list[bytes] = []
    subscription = doc.observe(lambda event: updates.append(event.update))
    action()
    doc.unobserve(subscription)
    return updates


# --- context ---------------------------------------------------------------------


def test_context_keeps_its_positional_form_and_gains_defaults() -> None:
    c = Context("u", frozenset({"approver"}), "dev", Origin.DEVICE, NOW)
    assert (c.bu, c.settings, c.geofence) == (None, RuleSettings(), None)
    assert c.settings.clock_skew == timedelta(minutes=5)
    assert (c.settings.max_accuracy_m, dict(c.settings.geofences)) == (100.0, {})
    assert c.has_role("approver") and not c.has_role("supervisor")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bu = "x"  # type: ignore[misc]


def test_settings_are_frozen_and_checked() -> None:
    fences = {"bu1": Geofence(1.0, 2.0, 100)}
    settings = RuleSettings(geofences=fences)
    fences["bu2"] = Geofence(0, 0, 1)
    assert list(settings.geofences) == ["bu1"]
    with pytest.raises(TypeError):
        settings.geofences["bu3"] = Geofence(0, 0, 1)  # type: ignore[index]
    with pytest.raises(ValueError, match="clock_skew"):
        RuleSettings(clock_skew=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="max_accuracy_m"):
        RuleSettings(max_accuracy_m=float("nan"))
    for lat, radius in ((91.0, 10.0), (0.0, 0.0), (0.0, float("inf"))):
        with pytest.raises(ValueError):
            Geofence(lat, 0.0, radius)
    with pytest.raises(ValueError, match="timezone"):
        Context("u", frozenset(), None, Origin.SERVER, datetime(2024, 1, 1))


def test_haversine_distance() -> None:
    # One degree of latitude is ~111.2 km everywhere.
    assert rules_common.distance_m(10, 20, 11, 20) == pytest.approx(111_195, rel=1e-3)
    assert rules_common.distance_m(0, 179.9, 0, -179.9) == pytest.approx(22_239, rel=1e-3)


# --- corrections -----------------------------------------------------------------


def test_new_correction_actions_are_checked() -> None:
    Correction("r", "k", None, "v", "why", "meta_set")
    Correction("r", "history", None, E1, "why", "history_append", is_repair=False)
    Correction("r", "history", None, E1, "why", "history_insert", index=0)
    Correction("r", "history", (E1,), None, "why", "history_remove", index=3, count=2)
    bad: list[Callable[[], object]] = [
        lambda: Correction("r", "k", None, NonScalar("map"), "why", "meta_set"),
        lambda: Correction("r", "history", None, {"a": NonScalar("map")}, "w", "history_append"),
        lambda: Correction("r", "history", None, "text", "why", "history_append"),
        lambda: Correction("r", "history", None, E1, "why", "history_insert"),
        lambda: Correction("r", "history", None, None, "why", "history_remove", index=-1),
        lambda: Correction("r", "f", None, 1, "why", "set", index=0),
        lambda: Correction("r", "f", None, 1, "why", "set", count=2),
        lambda: Correction("r", "history", (), None, "why", "history_remove", index=0, count=0),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


def test_slots_and_decisions_of_each_kind() -> None:
    field_fix = Correction("r", "level", 1, 2, "why")
    meta_fix = Correction("r", "lock.x", "me", None, "why", "meta_delete")
    append = Correction("r", "history", None, E1, "why", "history_append", is_repair=False)
    assert (field_fix.slot(), meta_fix.slot(), append.slot()) == (
        ("fields", "level"),
        ("meta", "lock.x"),
        None,
    )
    assert meta_fix.decision()["field"] == "meta.lock.x"
    assert append.decision() == {
        "rule": "r",
        "field": "history",
        "rejected": None,
        "kept": E1,
        "reason": "why",
    }
    assert constraints.decisions([field_fix, append, meta_fix]) == [
        field_fix.decision(),
        meta_fix.decision(),
    ]


def test_decisions_bound_what_they_quote() -> None:
    big = {f"key{i}": "x" * 500 for i in range(50)}
    fix = Correction("r", "history", (big,) * 40, None, "why", "history_remove", index=0, count=40)
    shown = fix.decision()["rejected"]
    assert isinstance(shown, list) and len(shown) == constraints.DECISION_ENTRIES
    assert len(json.dumps(fix.decision())) < 5_000


def rule_of(*corrections: Correction) -> Rule:
    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> list[Correction]:
        return list(corrections)

    return rule


def test_netting_keeps_history_corrections_in_order_and_merges_repair_flags() -> None:
    a1 = Correction("r", "history", None, E1, "why", "history_append", is_repair=False)
    a2 = Correction("r", "history", None, E1, "why", "history_append", is_repair=False)
    derived = Correction("d", "x", "device", "derived", "why", is_repair=False)
    refused = Correction("t", "x", "device", "typed", "why")
    domain = registry.get_model("activity")
    test_model = dataclasses.replace(domain, rules=(rule_of(refused, a1), rule_of(derived, a2)))
    got = constraints.evaluate(test_model, None, state(x="device"), BACKOFFICE)
    assert got == [dataclasses.replace(derived, is_repair=True), a1, a2]


# --- compensation beyond fields --------------------------------------------------


def test_compensate_writes_fields_meta_and_history_in_one_transaction() -> None:
    before = state({"a": 1}, meta={"k": "v", "gone": 1}, history=[E1, {"junk": 1}, E2])
    doc = doc_of(before)
    fixes = [
        Correction("r", "a", 1, 2, "why"),
        Correction("r", "k", "v", "w", "why", "meta_set"),
        Correction("r", "gone", 1, None, "why", "meta_delete"),
        Correction("r", "history", None, None, "why", "history_remove", index=1),
        Correction("r", "history", None, E2, "why", "history_insert", index=0),
        Correction("r", "history", None, E1, "why", "history_append", is_repair=False),
    ]
    updates = capture(doc, lambda: constraints.compensate(doc, fixes))
    assert len(updates) == 1
    got = record.read_state(doc, model("helpdesk"))
    expected = constraints.apply_to_state(before, fixes)
    assert comparable(got) == comparable(expected)
    assert comparable(got)["history"] == [E2, E1, E2, E1]
    assert dict(got.meta) == {"k": "w"}


def test_history_indexes_past_the_end_are_clamped_not_fatal() -> None:
    doc = doc_of(state(history=[E1]))
    fixes = [
        Correction("r", "history", None, None, "why", "history_remove", index=5, count=3),
        Correction("r", "history", None, E2, "why", "history_insert", index=9),
    ]
    constraints.compensate(doc, fixes)
    assert comparable(record.read_state(doc, model("helpdesk")))["history"] == [E1, E2]
    assert constraints.apply_to_state(state(history=[E1]), fixes).history == (E1, E2)


def test_read_state_reads_meta_one_level_and_materialize_shows_it_only_when_set() -> None:
    doc = doc_of(state({"jobdesc": "x"}, meta={"lock.a": "bo", "n": 2, "deep": NonScalar("map")}))
    got = record.read_state(replica(doc, 9), model("activity"))
    assert dict(got.meta) == {"lock.a": "bo", "n": 2.0, "deep": NonScalar("map")}
    assert record.materialize(got)["meta"] == {"lock.a": "bo", "n": 2, "deep": None}
    plain = record.read_state(doc_of(state({"jobdesc": "x"})), model("activity"))
    assert record.materialize(plain) == {"fields": {"jobdesc": "x"}}


@pytest.mark.parametrize("name", DOMAINS)
def test_devices_cannot_edit_meta_in_any_domain(name: str) -> None:
    before = state(meta={"lock.x": "bo1", "n": 1})
    after = state(meta={"n": 2, "new": "me", "bad": NonScalar("map")})
    got = evaluate(name, before, after)
    assert {(c.action, c.field, c.kept) for c in got} == {
        ("meta_set", "lock.x", "bo1"),
        ("meta_set", "n", 1),
        ("meta_delete", "new", None),
        ("meta_delete", "bad", None),
    }
    assert all(c.rule == rules_common.RULE_META and c.is_repair for c in got)
    assert evaluate(name, None, state(meta={"x": 1}))[0].action == "meta_delete"


@pytest.mark.parametrize("name", DOMAINS)
def test_every_domain_starts_with_the_base_rules(name: str) -> None:
    rules = model(name).rules
    assert getattr(rules[0], "__name__", None) == "check_types"
    assert rules[1] is rules_common.protect_meta


def test_only_models_with_history_protect_it() -> None:
    assert [name for name in DOMAINS if protect_history in model(name).rules] == ["helpdesk"]


def test_history_alignment_stays_fast_on_hostile_input() -> None:
    old = [{**E1, "n": i} for i in range(2_000)]
    new: list[object] = []
    for i, entry in enumerate(old):
        new += [{"junk": i % 3}] * 40 + ([] if i % 5 == 0 else [entry])
    started = time.perf_counter()
    got = evaluate("helpdesk", state(history=old), state(history=new))
    assert time.perf_counter() - started < 5
    fixed = constraints.apply_to_state(state(history=new), got)
    assert [dict(e) for e in fixed.history] == old  # type: ignore[arg-type]


# --- back-office edits -----------------------------------------------------------


def test_backoffice_edit_sets_and_removes_fields_as_one_server_transaction() -> None:
    domain = model("activity")
    doc = doc_of(state(jobdesc="old", remarks="r", gracetime=5))
    seen: list[object] = []
    open_transaction = doc.transaction

    def spy(origin: object = None) -> Any:
        seen.append(origin)
        return open_transaction(origin)

    doc.transaction = spy  # type: ignore[method-assign]
    edit_ = {"jobdesc": "new", "remarks": None, "gracetime": 5, "assignee": None, "lat": 12}
    updates = capture(doc, lambda: constraints.backoffice_edit(doc, domain, edit_))
    assert len(updates) == 1 and SERVER_ORIGIN in seen
    got = record.read_state(doc, domain)
    assert dict(got.fields) == {"jobdesc": "new", "gracetime": 5, "lat": 12}


def test_backoffice_edit_that_changes_nothing_writes_nothing() -> None:
    domain = model("activity")
    doc = doc_of(state(jobdesc="same"))
    edit_ = {"jobdesc": "same", "remarks": None}
    assert capture(doc, lambda: constraints.backoffice_edit(doc, domain, edit_)) == []


@pytest.mark.parametrize(
    "values",
    [{"colour": "red"}, {"jobdesc": {"a": 1}}, {"jobdesc": [1]}, {"gracetime": 2**60}, {"x": b""}],
)
def test_backoffice_edit_refuses_what_a_record_cannot_hold(values: dict[str, object]) -> None:
    domain = model("activity")
    doc = doc_of(state(jobdesc="x"))
    with pytest.raises(InvalidEdit):
        constraints.backoffice_edit(doc, domain, {"remarks": "ok", **values})
    assert dict(record.read_state(doc, domain).fields) == {"jobdesc": "x"}


def test_backoffice_edit_refuses_to_join_another_transaction() -> None:
    doc = doc_of(state(jobdesc="x"))
    with doc.transaction(), pytest.raises(RuntimeError):
        constraints.backoffice_edit(doc, model("activity"), {"jobdesc": "y"})


def test_backoffice_edit_then_constraints_like_the_server_does() -> None:
    server = doc_of(state(jobstatus="COMPLETED", jobdesc="x"), client_id=1)
    before = record.read_state(server, model("activity"))
    constraints.backoffice_edit(
        server, model("activity"), {"jobstatus": "ASSIGNED", "jobdesc": "y"}
    )
    done = merge(server, "activity", before, b"\x00\x00", BACKOFFICE)
    assert dict(done.repaired.fields) == {"jobstatus": "COMPLETED", "jobdesc": "y"}
    assert [d["field"] for d in constraints.decisions(done.corrections)] == ["jobstatus"]


def test_a_nested_value_in_a_field_does_not_break_a_backoffice_edit() -> None:
    device = doc_of(state(jobdesc="x"), client_id=5)
    update = edit(
        device, lambda d: d.get("fields", type=Map).__setitem__("jobdesc", Map({"a": Map()}))
    )
    server = replica(device, 1)
    server.apply_update(update)
    constraints.backoffice_edit(server, model("activity"), {"jobdesc": "clean"})
    assert record.read_state(server, model("activity")).fields["jobdesc"] == "clean"
    assert isinstance(server.get("fields", type=Map), Map)
    assert isinstance(server.get(record.HISTORY_ROOT, type=Array), Array)
