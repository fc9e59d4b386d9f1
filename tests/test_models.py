"""crdt_models: record shapes, safe reading, the type-check rule and compensation (no I/O)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from crdt_models import constraints, record, registry
from crdt_models.constraints import Context, Correction, Origin
from crdt_models.record import NonScalar, RecordState
from crdt_models.rules_common import RULE_TYPE, RULE_UNKNOWN_FIELD
from crdt_models.schema import DomainModel, Field, FieldType, Rule, build_model
from tests import test_rules_support as support

STR, INT, NUM, BOOL = FieldType.STRING, FieldType.INT, FieldType.NUMBER, FieldType.BOOL
DTM, DATE, ENUM, REF = FieldType.DATETIME, FieldType.DATE, FieldType.ENUM, FieldType.REF

EXPECTED_FIELDS: dict[str, dict[str, FieldType]] = {
    "activity": {
        "jobdesc": STR, "plandatetime": DTM, "expirydatetime": DTM, "gracetime": INT,
        "priority": ENUM, "jobstatus": ENUM, "assignee": REF, "starttime": DTM, "endtime": DTM,
        "lat": NUM, "lon": NUM, "remarks": STR,
    },
    "work-orders": {
        "description": STR, "plandatetime": DTM, "expirydatetime": DTM, "gracetime": INT,
        "priority": ENUM, "workstatus": ENUM, "workpermit": ENUM, "vendor": REF, "performedby": REF,
        "lat": NUM, "lon": NUM, "remarks": STR,
    },
    "attendance": {
        "people": REF, "datefor": DATE, "punchintime": DTM, "punchouttime": DTM, "lat_in": NUM,
        "lon_in": NUM, "lat_out": NUM, "lon_out": NUM, "accuracy": NUM, "shift": REF,
        "remarks": STR, "verified": BOOL, "verifiedby": REF, "approval": STR,
    },
    "helpdesk": {
        "ticketdesc": STR, "priority": ENUM, "status": ENUM, "level": INT, "isescalated": BOOL,
        "assignedtopeople": REF, "assignedtogroup": REF, "comments": STR,
    },
}  # fmt: skip

EXPECTED_CHOICES = {
    ("activity", "jobstatus"): {
        "ASSIGNED", "INPROGRESS", "WORKING", "STANDBY", "PARTIALLYCOMPLETED", "COMPLETED",
        "AUTOCLOSED",
    },
    ("work-orders", "workstatus"): {"ASSIGNED", "INPROGRESS", "COMPLETED", "CANCELLED"},
    ("work-orders", "workpermit"): {
        "NOT_REQUIRED", "APPROVED", "REJECTED", "PARTIALLY_APPROVED",
    },
    ("helpdesk", "status"): {"NEW", "OPEN", "ONHOLD", "RESOLVED", "CLOSED", "CANCELLED"},
    ("activity", "priority"): {"LOW", "MEDIUM", "HIGH"},
    ("work-orders", "priority"): {"LOW", "MEDIUM", "HIGH"},
    ("helpdesk", "priority"): {"LOW", "MEDIUM", "HIGH"},
}  # fmt: skip

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
CTX = Context(user="u1", roles=frozenset(), device="dev-1", origin=Origin.DEVICE, now=NOW)


# --- helpers -------------------------------------------------------------------------


def model(name: str) -> DomainModel:
    return registry.get_model(name)


def state(**fields: object) -> RecordState:
    return RecordState(fields=fields)


def doc_with(**fields: object) -> Doc[Any]:
    doc = record.new_doc()
    ymap = doc.get(record.FIELDS_ROOT, type=Map)
    with doc.transaction():
        for key, value in fields.items():
            ymap[key] = value
    return doc


def replica(doc: Doc[Any]) -> Doc[Any]:
    """A second doc holding what ``doc`` holds, as a device or peer would."""
    copy = record.new_doc()
    copy.apply_update(doc.get_update())
    return copy


def check(name: str, after: RecordState, before: RecordState | None = None) -> list[Correction]:
    return constraints.evaluate(model(name), before, after, CTX)


def types_only(name: str) -> DomainModel:
    """The domain with its type check alone (business rules are tested in test_rules_*)."""
    domain = model(name)
    return build_model(name, domain.fields.values(), domain.rules[:1], domain.arrays)


def check_types(
    name: str, after: RecordState, before: RecordState | None = None
) -> list[Correction]:
    return constraints.evaluate(types_only(name), before, after, CTX)


def only(corrections: list[Correction]) -> Correction:
    assert len(corrections) == 1, corrections
    return corrections[0]


def nest_maps(doc: Doc[Any], key: str, depth: int) -> None:
    """fields[key] = Map{a: Map{a: ...}} ``depth`` levels deep, in one transaction."""
    with doc.transaction():
        current: Map[Any] = Map()
        doc.get(record.FIELDS_ROOT, type=Map)[key] = current
        for _ in range(depth):
            inner: Map[Any] = Map()
            current["a"] = inner
            current = inner


@pytest.fixture
def no_recursive_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if anything calls pycrdt's recursive readers on a nested value."""

    def forbidden(*_: object) -> None:
        raise AssertionError("recursive read of an untrusted shared type")

    for cls in (Map, Array):
        for name in ("to_py", "__str__", "__repr__"):
            monkeypatch.setattr(cls, name, forbidden)
    yield


# --- registry and shapes -------------------------------------------------------------


def test_registry_lists_the_four_domains() -> None:
    assert registry.domains() == ("activity", "attendance", "helpdesk", "work-orders")
    for name in registry.domains():
        assert registry.get_model(name).name == name


def test_unknown_domain_is_a_key_error() -> None:
    with pytest.raises(registry.UnknownDomain):
        registry.get_model("payroll")
    with pytest.raises(KeyError):
        registry.get_model("")


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_domain_fields_and_types(name: str) -> None:
    fields = model(name).fields
    assert {key: field.type for key, field in fields.items()} == EXPECTED_FIELDS[name]
    assert all(key == field.name for key, field in fields.items())


@pytest.mark.parametrize(("name", "field"), sorted(EXPECTED_CHOICES))
def test_enum_choices_follow_the_design(name: str, field: str) -> None:
    assert model(name).fields[field].choices == frozenset(EXPECTED_CHOICES[(name, field)])


def test_server_owned_fields_and_root_arrays() -> None:
    owned = {
        name: {key for key, field in model(name).fields.items() if field.server_owned}
        for name in registry.domains()
    }
    assert owned == {
        "activity": set(),
        "attendance": {"verified", "verifiedby", "approval"},
        "helpdesk": set(),
        "work-orders": set(),
    }
    assert {name: model(name).arrays for name in registry.domains()} == {
        "activity": (),
        "attendance": (),
        "helpdesk": ("history",),
        "work-orders": (),
    }


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_type_check_is_the_first_rule(name: str) -> None:
    assert getattr(model(name).rules[0], "__name__", None) == "check_types"


def test_build_model_refuses_bad_declarations() -> None:
    with pytest.raises(ValueError, match="twice"):
        build_model("x", [Field("a", STR), Field("a", INT)], [])
    with pytest.raises(ValueError, match="arrays"):
        build_model("x", [Field("a", STR)], [], arrays=("comments",))
    with pytest.raises(ValueError, match="choices"):
        Field("a", ENUM)
    with pytest.raises(ValueError, match="minimum"):
        Field("a", STR, minimum=0)


# --- reading docs safely -------------------------------------------------------------


def test_read_state_reads_scalars_and_ints_come_back_as_floats() -> None:
    doc = doc_with(jobdesc="fix pump", gracetime=15, lat=12.5, jobstatus=None)
    got = record.read_state(doc, model("activity"))
    assert dict(got.fields) == {
        "jobdesc": "fix pump",
        "gracetime": 15.0,
        "lat": 12.5,
        "jobstatus": None,
    }
    assert isinstance(got.fields["gracetime"], float)
    assert got.history == () and not got.has_history


def test_read_state_marks_nested_values_without_reading_them(no_recursive_reads: None) -> None:
    doc = doc_with(
        jobdesc=Map({"a": Map({"b": 1})}),
        remarks=Array([Array([1])]),
        assignee=Text("x"),
        lat={"json": {"object": 1}},
        lon=[1, [2]],
        priority=b"\x00\x01",
    )
    got = record.read_state(replica(doc), model("activity")).fields
    assert got == {
        "jobdesc": NonScalar("map"),
        "remarks": NonScalar("array"),
        "assignee": NonScalar("text"),
        "lat": NonScalar("json-map"),
        "lon": NonScalar("json-array"),
        "priority": NonScalar("bytes"),
    }
    assert record.materialize(RecordState(got))["fields"] == dict.fromkeys(got)


def test_deeply_nested_field_is_neither_descended_nor_fatal(no_recursive_reads: None) -> None:
    device = record.new_doc()
    nest_maps(device, "ticketdesc", 5_000)
    server = replica(device)
    helpdesk = model("helpdesk")
    after = record.read_state(server, helpdesk)
    assert after.fields == {"ticketdesc": NonScalar("map")}
    assert record.materialize(after) == {"fields": {"ticketdesc": None}, "history": []}
    fix = only(constraints.evaluate(helpdesk, None, after, CTX))
    assert fix.decision()["rejected"] == "<map>"
    constraints.compensate(server, [fix])
    assert record.read_state(server, helpdesk).fields == {}


def test_read_state_survives_nesting_that_crashes_recursive_readers() -> None:
    """30,000 nested maps overflow pycrdt's recursive str()/to_py(); run in a child process."""
    script = textwrap.dedent(
        """
        from pycrdt import Map
        from crdt_models import record, registry
        doc = record.new_doc()
        with doc.transaction():
            cur = Map()
            doc.get("fields", type=Map)["status"] = cur
            for _ in range(30_000):
                nxt = Map(); cur["a"] = nxt; cur = nxt
        copy = record.new_doc(); copy.apply_update(doc.get_update())
        state = record.read_state(copy, registry.get_model("helpdesk"))
        print(record.materialize(state))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "{'status': None}" in done.stdout


def test_history_entries_are_read_one_level(no_recursive_reads: None) -> None:
    doc = doc_with(status="OPEN")
    history = doc.get(record.HISTORY_ROOT, type=Array)
    history.append(Map({"when": "2024-05-01T12:00:00Z", "field": "level", "from": 0, "to": 1}))
    history.append(Map({"who": Map({"deep": Map()})}))
    history.append({"action": "set", "to": {"nested": 1}})
    history.append("not an entry")
    history.append(Array([1]))
    got = record.read_state(replica(doc), model("helpdesk"))
    assert got.has_history
    assert got.history == (
        {"when": "2024-05-01T12:00:00Z", "field": "level", "from": 0.0, "to": 1.0},
        {"who": NonScalar("map")},
        {"action": "set", "to": NonScalar("json-map")},
        NonScalar("str"),
        NonScalar("array"),
    )
    assert record.materialize(got)["history"] == [
        {"when": "2024-05-01T12:00:00Z", "field": "level", "from": 0, "to": 1},
        {"who": None},
        {"action": "set", "to": None},
        None,
        None,
    ]


def test_history_is_ignored_by_models_without_it() -> None:
    doc = doc_with(jobdesc="x")
    doc.get(record.HISTORY_ROOT, type=Array).append("entry")
    assert record.materialize(record.read_state(doc, model("activity"))) == {
        "fields": {"jobdesc": "x"}
    }


def test_read_state_writes_nothing() -> None:
    doc = record.new_doc()
    updates: list[bytes] = []
    subscription = doc.observe(lambda event: updates.append(event.update))
    for name in registry.domains():
        record.read_state(doc, model(name))
    doc.unobserve(subscription)
    assert all(len(update) <= 2 for update in updates)  # at most empty updates


def test_materialize_gives_ints_for_integral_floats() -> None:
    got = record.materialize(state(gracetime=15.0, level=2, lat=1.5, big=2.0**60, nan=math.nan))
    assert got == {"fields": {"gracetime": 15, "level": 2, "lat": 1.5, "big": 2.0**60, "nan": None}}
    assert type(got["fields"]["gracetime"]) is int  # type: ignore[index]
    json.dumps(got, allow_nan=False)


def test_new_doc_uses_the_given_client_id() -> None:
    assert record.new_doc(client_id=4242).client_id == 4242


# --- check_types ---------------------------------------------------------------------


def test_wrong_type_restores_the_valid_before_value() -> None:
    fix = only(check("activity", state(gracetime="15m"), before=state(gracetime=10.0)))
    assert (fix.rule, fix.field, fix.rejected, fix.kept, fix.action) == (
        RULE_TYPE,
        "gracetime",
        "15m",
        10.0,
        "set",
    )
    assert fix.reason.startswith(
        "gracetime must be an integer number of minutes; got the string '15m'"
    )
    assert "previous value" in fix.reason


@pytest.mark.parametrize(
    "before", [None, state(), state(gracetime="also bad"), state(gracetime=-3)]
)
def test_wrong_type_without_a_valid_before_value_is_deleted(before: RecordState | None) -> None:
    fix = only(check("activity", state(gracetime=True), before=before))
    assert (fix.rule, fix.action, fix.kept, fix.rejected) == (RULE_TYPE, "delete", None, True)


def test_wrong_type_falls_back_to_the_valid_value_the_same_merge_wrote_before_it() -> None:
    """gracetime 10, then "15m", from one phone, merged at once: delivered in order 10
    would have stood when "15m" was refused, so 10 stays (not the record's 5)."""
    before = state(jobdesc="x", gracetime=5)
    writes: list[dict[str, object]] = [{"gracetime": 10}, {"gracetime": "15m"}]
    done = support.merged_at_once("activity", before, writes, support.DEVICE)
    fix = only(done.corrections)
    assert (fix.rule, fix.rejected, fix.kept, fix.action) == (RULE_TYPE, "15m", 10, "set")
    assert done.repaired.fields["gracetime"] == 10


def test_wrong_type_never_falls_back_to_another_wrong_value() -> None:
    writes: list[dict[str, object]] = [{"gracetime": -3}, {"gracetime": "15m"}]
    done = support.merged_at_once("activity", state(jobdesc="x"), writes, support.DEVICE)
    assert "gracetime" not in done.repaired.fields


def test_null_before_value_is_restored_as_null() -> None:
    fix = only(check("helpdesk", state(status="LOST"), before=state(status=None)))
    assert (fix.action, fix.kept) == ("set", None)


def test_unknown_field_is_deleted() -> None:
    fix = only(check("activity", state(jobdesc="ok", colour="red")))
    assert (fix.rule, fix.field, fix.rejected, fix.action) == (
        RULE_UNKNOWN_FIELD,
        "colour",
        "red",
        "delete",
    )


def test_naive_datetime_needs_a_timezone() -> None:
    fix = only(check("activity", state(starttime="2024-05-01T08:30:00")))
    assert fix.field == "starttime" and "timezone" in fix.reason


@pytest.mark.parametrize(
    "value",
    ["2024-05-01T08:30:00Z", "2024-05-01T08:30:00+05:30", "2024-05-01T08:30:00.123456-04:00", None],
)
def test_datetimes_with_timezone_are_accepted(value: str | None) -> None:
    assert check_types("attendance", state(punchintime=value, punchouttime=value)) == []


@pytest.mark.parametrize("value", ["yesterday", "2024-02-30T00:00:00Z", 1714550400, ""])
def test_unparseable_datetimes_are_rejected(value: object) -> None:
    assert only(check("work-orders", state(plandatetime=value))).rule == RULE_TYPE


def test_datefor_is_a_calendar_date() -> None:
    assert check("attendance", state(datefor="2024-05-01")) == []
    for bad in ("2024-05-01T00:00:00Z", "2024-13-01", "20240501", "1 May 2024"):
        assert only(check("attendance", state(datefor=bad))).field == "datefor"


@pytest.mark.parametrize(("name", "field"), sorted(EXPECTED_CHOICES))
def test_enum_outside_choices_is_rejected(name: str, field: str) -> None:
    fix = only(check(name, state(**{field: "SOMETHING_ELSE"})))
    assert fix.field == field and "must be one of" in fix.reason
    assert only(check(name, state(**{field: "low"}))).rule == RULE_TYPE  # case matters


def test_gracetime_and_level_must_not_be_negative() -> None:
    fix = only(check("activity", state(gracetime=-1.0)))
    assert fix.reason.startswith("gracetime must be at least 0 minutes; got -1")
    assert only(check("helpdesk", state(level=-1))).field == "level"
    assert check("work-orders", state(gracetime=0)) == []


@pytest.mark.parametrize("value", [1.5, True, "3", 2.0**53 + 2, math.inf, math.nan])
def test_int_fields_reject_non_integers(value: object) -> None:
    assert only(check("helpdesk", state(level=value))).rule == RULE_TYPE


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, False, "12.5"])
def test_number_fields_reject_non_finite_and_non_numbers(value: object) -> None:
    assert only(check("activity", state(lat=value))).field == "lat"


def test_bool_refs_and_strings() -> None:
    assert (
        check_types(
            "helpdesk", state(isescalated=False, assignedtopeople="p-1", assignedtogroup=7.0)
        )
        == []
    )
    assert only(check("helpdesk", state(isescalated=1))).field == "isescalated"
    assert only(check("helpdesk", state(assignedtopeople=""))).field == "assignedtopeople"
    assert only(check("helpdesk", state(assignedtogroup=1.5))).field == "assignedtogroup"
    assert only(check("helpdesk", state(comments=12))).field == "comments"


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
def test_null_is_accepted_for_every_field(name: str) -> None:
    assert check(name, state(**dict.fromkeys(model(name).fields))) == []


def test_nested_value_in_a_known_field_is_rejected() -> None:
    fix = only(check("activity", state(jobdesc=NonScalar("text")), before=state(jobdesc="old")))
    assert (fix.kept, fix.action) == ("old", "set")
    assert "nested text" in fix.reason


def test_decisions_are_json_ready() -> None:
    long_text = "x" * 10_000
    after = state(
        lat=math.nan, lon=math.inf, gracetime=NonScalar("map"), jobdesc=3.0, remarks=None,
        priority=long_text, junk=NonScalar("xml"),
    )  # fmt: skip
    before = state(lat=1.0, jobdesc="old")
    decisions = [c.decision() for c in check("activity", after, before)]
    assert {d["field"] for d in decisions} == {
        "lat",
        "lon",
        "gracetime",
        "jobdesc",
        "priority",
        "junk",
    }
    text = json.dumps(decisions, allow_nan=False)
    assert len(text) < 5_000
    by_field = {d["field"]: d for d in decisions}
    assert by_field["lat"]["rejected"] == "nan" and by_field["lat"]["kept"] == 1
    assert by_field["gracetime"]["rejected"] == "<map>"
    assert by_field["jobdesc"]["rejected"] == 3
    assert set(by_field["lat"]) == {"rule", "field", "rejected", "kept", "reason"}


# --- hypothesis: valid states pass, repaired states stay repaired --------------------

MAX_INT = 2**53


def iso_datetime(moment: datetime) -> str:
    text = moment.isoformat()
    return text[: -len("+00:00")] + "Z" if text.endswith("+00:00") else text


def valid_values(field: Field) -> st.SearchStrategy[object]:
    low = -MAX_INT if field.minimum is None else int(field.minimum)
    zones = st.just(UTC) | st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
    by_type: dict[FieldType, st.SearchStrategy[object]] = {
        STR: st.text(),
        INT: st.integers(low, MAX_INT) | st.integers(low, MAX_INT).map(float),
        NUM: st.floats(low, allow_nan=False, allow_infinity=False) | st.integers(low, 10**20),
        BOOL: st.booleans(),
        DTM: st.datetimes(timezones=zones).map(iso_datetime),
        DATE: st.dates().map(lambda d: d.isoformat()),
        ENUM: st.sampled_from(sorted(field.choices or ())),
        REF: st.text(min_size=1) | st.integers(-MAX_INT, MAX_INT),
    }
    return st.none() | by_type[field.type]


def valid_states(domain: DomainModel) -> st.SearchStrategy[RecordState]:
    optional = {name: valid_values(field) for name, field in domain.fields.items()}
    return st.fixed_dictionaries({}, optional=optional).map(lambda f: RecordState(fields=f))


def any_states(domain: DomainModel) -> st.SearchStrategy[RecordState]:
    values = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=30)
        | st.builds(NonScalar, st.sampled_from(["map", "array", "text"]))
    )
    keys = st.sampled_from(sorted(domain.fields)) | st.text(max_size=8)
    return st.dictionaries(keys, values, max_size=12).map(lambda f: RecordState(fields=f))


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_valid_states_need_no_corrections(name: str, data: st.DataObject) -> None:
    domain = types_only(name)
    before = data.draw(st.none() | valid_states(domain))
    after = data.draw(valid_states(domain))
    assert constraints.evaluate(domain, before, after, CTX) == []


@pytest.mark.parametrize("name", sorted(EXPECTED_FIELDS))
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_corrected_states_pass_a_second_evaluation(name: str, data: st.DataObject) -> None:
    domain = types_only(name)
    before = data.draw(st.none() | any_states(domain))
    after = data.draw(any_states(domain))
    fixed = constraints.apply_to_state(after, constraints.evaluate(domain, before, after, CTX))
    assert constraints.evaluate(domain, before, fixed, CTX) == []
    json.dumps(
        [c.decision() for c in constraints.evaluate(domain, before, after, CTX)], allow_nan=False
    )


# --- the engine ----------------------------------------------------------------------


def rule_setting(field: str, value: object, seen: list[object]) -> Rule:
    def rule(before: RecordState | None, after: RecordState, ctx: Context) -> Iterable[Correction]:
        seen.append(after.fields.get(field))
        return [Correction(f"test.{value}", field, after.fields.get(field), value, f"set {value}")]

    return rule


def test_later_rules_see_earlier_corrections_and_the_last_one_wins() -> None:
    seen: list[object] = []
    rules = (rule_setting("x", "a", seen), rule_setting("x", "b", seen))
    domain = build_model("test", [Field("x", STR)], rules)
    fix = only(constraints.evaluate(domain, None, state(x="device"), CTX))
    assert seen == ["device", "a"]
    assert (fix.rule, fix.rejected, fix.kept) == ("test.b", "device", "b")


def test_a_correction_back_to_the_device_value_is_dropped() -> None:
    rules = (rule_setting("x", "a", []), rule_setting("x", "device", []))
    domain = build_model("test", [Field("x", STR)], rules)
    assert constraints.evaluate(domain, None, state(x="device"), CTX) == []


def test_apply_to_state_is_pure() -> None:
    original = state(a=1, b=2)
    fixes = [Correction("r", "a", 1, 5, "why"), Correction("r", "b", 2, None, "why", "delete")]
    assert constraints.apply_to_state(original, fixes).fields == {"a": 5}
    assert original.fields == {"a": 1, "b": 2}


def test_context_and_correction_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="timezone"):
        Context(
            user="u", roles=frozenset(), device=None, origin=Origin.SERVER, now=datetime(2024, 1, 1)
        )
    with pytest.raises(ValueError, match="action"):
        Correction("r", "f", 1, 2, "why", "append")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nested"):
        Correction("r", "f", 1, NonScalar("map"), "why")
    assert [str(origin) for origin in Origin] == ["device", "backoffice", "server"]


# --- compensation --------------------------------------------------------------------


def capture(doc: Doc[Any], action: Callable[[], None]) -> list[bytes]:
    updates: list[bytes] = []
    subscription = doc.observe(lambda event: updates.append(event.update))
    action()
    doc.unobserve(subscription)
    return updates


def test_compensation_is_one_transaction_and_does_not_ping_pong() -> None:
    activity = model("activity")
    server = doc_with(gracetime=10, jobdesc="fix pump")
    device = replica(server)
    before = record.read_state(server, activity)
    device_map = device.get(record.FIELDS_ROOT, type=Map)
    with device.transaction():
        device_map["gracetime"] = "15m"
        device_map["colour"] = "red"
        device_map["lat"] = Map({"x": 1})
    server.apply_update(device.get_update(server.get_state()))
    after = record.read_state(server, activity)

    fixes = constraints.evaluate(activity, before, after, CTX)
    assert {(c.field, c.action) for c in fixes} == {
        ("gracetime", "set"),
        ("colour", "delete"),
        ("lat", "delete"),
    }
    updates = capture(server, lambda: constraints.compensate(server, fixes))
    assert len(updates) == 1

    repaired = record.read_state(server, activity)
    assert constraints.evaluate(activity, before, repaired, CTX) == []
    assert record.materialize(repaired) == {"fields": {"gracetime": 10, "jobdesc": "fix pump"}}

    device.apply_update(updates[0])
    assert record.materialize(record.read_state(device, activity)) == record.materialize(repaired)


def test_compensation_transaction_carries_the_server_origin() -> None:
    doc = doc_with(colour="red")
    origins: list[object] = []
    open_transaction = doc.transaction

    def spy(origin: object = None) -> Any:
        origins.append(origin)
        return open_transaction(origin)

    doc.transaction = spy  # type: ignore[method-assign]
    fix = Correction("r", "colour", "red", None, "why", "delete")
    updates = capture(doc, lambda: constraints.compensate(doc, [fix]))
    assert origins[0] == constraints.SERVER_ORIGIN == "fieldsync-server"
    assert len(updates) == 1


def test_compensate_refuses_to_join_another_transaction() -> None:
    doc = doc_with(colour="red")
    fix = Correction("r", "colour", "red", None, "why", "delete")
    with doc.transaction(), pytest.raises(RuntimeError):
        constraints.compensate(doc, [fix])
    with doc.transaction(origin="device"), pytest.raises(RuntimeError):
        constraints.compensate(doc, [fix])
    assert record.read_state(doc, model("activity")).fields == {"colour": "red"}


def test_nothing_to_compensate_writes_nothing() -> None:
    doc = doc_with(jobdesc="x")
    assert capture(doc, lambda: constraints.compensate(doc, [])) == []
