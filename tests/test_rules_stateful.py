"""Stateful tests, one per domain: a server doc and three device docs, in pure pycrdt.

Devices edit offline (valid and invalid values, status jumps, level drops, meta and
history tampering), go offline and online; the server receives their queued updates
in any order, some twice, and merges each as ``server/pipeline.py`` does (apply,
evaluate, compensate in one transaction), queueing the device's update and the
compensation to the other devices. The back office edits through the server; the
server's own jobs edit too. Devices receive queued updates in any order.

Invariants: after every merge the move is one the rules allow (``transition_problems``)
and the server's state is valid (``violations``) and a fixed point; at the end, after a
full exchange, every device equals the server.

Client ids: the server is 1000, devices are 5, 2000 and 3000, so Yjs resolves
concurrent writes of one key both for and against the server, and a late device
update can make an old value win on the server, which the rules must repair.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pycrdt import Doc, Map

from crdt_models import constraints, record
from crdt_models.constraints import Context, Origin
from crdt_models.record import RecordState
from tests.test_rules_properties import apply_history_ops, history_ops
from tests.test_rules_support import (
    DELETE,
    INSIDE,
    META_KEYS,
    NESTED,
    OUTSIDE,
    SERVER,
    at,
    comparable,
    ctx,
    edit,
    evaluate,
    field_changes,
    merge,
    model,
    put,
    transition_problems,
    violations,
)

SCALE = int(os.environ.get("FIELDSYNC_TEST_SCALE", "1"))
"""Multiply examples (e.g. 20 for a long run); FIELDSYNC_TEST_STEPS sets steps per example."""
STATEFUL = settings(
    max_examples=30 * SCALE,
    stateful_step_count=int(os.environ.get("FIELDSYNC_TEST_STEPS", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SERVER_CLIENT = 1000


@dataclass
class Device:
    doc: Doc[Any]
    ctx: Context
    online: bool = True
    outbox: list[bytes] = field(default_factory=list)
    inbox: list[bytes] = field(default_factory=list)


class RecordSync(RuleBasedStateMachine):
    NAME: ClassVar[str]
    FOCUS: ClassVar[dict[str, list[object]]]
    """The fields (and values) the domain's business rules judge, drawn more often."""
    TYPICAL: ClassVar[dict[str, object]]
    """A typical new record."""

    def __init__(self) -> None:
        super().__init__()
        self.model = model(self.NAME)
        self.server = record.new_doc(SERVER_CLIENT)
        self.state: RecordState | None = None
        self.devices = [
            Device(record.new_doc(5), ctx(user="tech1")),
            Device(record.new_doc(2000), ctx(roles=["approver", "supervisor"], user="lead")),
            Device(record.new_doc(3000), ctx(user="tech2")),
        ]

    # -- the server ------------------------------------------------------------------

    @initialize(data=st.data(), who=st.integers(0, 2), typical=st.booleans())
    def a_device_creates_the_record(self, data: st.DataObject, who: int, typical: bool) -> None:
        """Random fields, or (``typical``) the record as the back office usually sends it."""
        if typical:
            fields = self.TYPICAL
            self.devices[who].outbox.append(
                edit(self.devices[who].doc, lambda doc: self.put_all(doc, fields))
            )
        else:
            self.device_edits(data, who)
        self.server_receives_a_queued_update(who, 0, False)

    @staticmethod
    def put_all(doc: Doc[Any], values: dict[str, object]) -> None:
        fields = doc.get(record.FIELDS_ROOT, type=Map)
        for key, value in values.items():
            put(fields, key, value)

    def merge(self, update: bytes, context: Context, source: Device | None) -> None:
        done = merge(self.server, self.NAME, self.state, update, context)
        for correction in done.corrections:
            event(f"{correction.rule} {correction.action} ({context.origin})")
        self.accept(done.repaired, context, done.compensation, done.compensation_updates)
        for device in self.devices:
            if device is not source:
                device.inbox.append(update)

    def accept(
        self, repaired: RecordState, context: Context, compensation: bytes | None, count: int
    ) -> None:
        assert count <= 1
        assert transition_problems(self.NAME, self.state, repaired, context) == []
        assert evaluate(self.NAME, repaired, repaired, context) == []
        self.state = repaired
        if compensation is not None:
            for device in self.devices:
                device.inbox.append(compensation)

    def server_edit(self, values: dict[str, object], context: Context) -> None:
        """A back-office (or server job) edit: written by the server, then constrained."""
        since = self.server.get_state()
        constraints.backoffice_edit(self.server, self.model, values)
        edit_update = self.server.get_update(since)
        done = merge(self.server, self.NAME, self.state, b"\x00\x00", context)
        for correction in done.corrections:
            event(f"{correction.rule} {correction.action} ({context.origin})")
        for device in self.devices:
            device.inbox.append(edit_update)
        self.accept(done.repaired, context, done.compensation, done.compensation_updates)

    @invariant()
    def the_server_state_is_valid(self) -> None:
        if self.state is not None:
            assert violations(self.NAME, self.state, SERVER) == []
            assert comparable(record.read_state(self.server, self.model)) == comparable(self.state)

    # -- devices ---------------------------------------------------------------------

    @rule(data=st.data(), who=st.integers(0, 2))
    def device_edits(self, data: st.DataObject, who: int) -> None:
        changes = data.draw(field_changes(self.NAME))
        device = self.devices[who]
        device.outbox.append(edit(device.doc, lambda doc: self.put_all(doc, changes)))

    @rule(data=st.data(), who=st.integers(0, 2))
    def device_edits_a_ruled_field(self, data: st.DataObject, who: int) -> None:
        key = data.draw(st.sampled_from(sorted(self.FOCUS)))
        value = data.draw(st.sampled_from(self.FOCUS[key]))
        device = self.devices[who]
        device.outbox.append(edit(device.doc, lambda doc: self.put_all(doc, {key: value})))

    @rule(
        who=st.integers(0, 2),
        key=st.sampled_from(META_KEYS),
        value=st.sampled_from(["me", NESTED, DELETE]),
    )
    def device_tampers_with_meta(self, who: int, key: str, value: object) -> None:
        device = self.devices[who]
        update = edit(device.doc, lambda doc: put(doc.get(record.META_ROOT, type=Map), key, value))
        device.outbox.append(update)

    @rule(who=st.integers(0, 2), ops=history_ops())
    def device_tampers_with_history(self, who: int, ops: list[tuple[str, int, object]]) -> None:
        device = self.devices[who]
        device.outbox.append(edit(device.doc, lambda doc: apply_history_ops(doc, ops)))

    @rule(who=st.integers(0, 2))
    def device_goes_offline_or_online(self, who: int) -> None:
        self.devices[who].online = not self.devices[who].online

    @rule(who=st.integers(0, 2), pick=st.integers(0, 100), twice=st.booleans())
    def server_receives_a_queued_update(self, who: int, pick: int, twice: bool) -> None:
        device = self.devices[who]
        if not device.online or not device.outbox:
            return
        index = pick % len(device.outbox)
        update = device.outbox[index] if twice else device.outbox.pop(index)
        self.merge(update, device.ctx, device)

    @rule(who=st.integers(0, 2))
    def device_pushes_all_the_server_lacks(self, who: int) -> None:
        device = self.devices[who]
        if device.online:
            self.merge(device.doc.get_update(self.server.get_state()), device.ctx, device)

    @rule(who=st.integers(0, 2), pick=st.integers(0, 100), count=st.integers(1, 4))
    def device_receives_queued_updates(self, who: int, pick: int, count: int) -> None:
        device = self.devices[who]
        for _ in range(count):
            if not device.online or not device.inbox:
                return
            device.doc.apply_update(device.inbox.pop(pick % len(device.inbox)))

    # -- back office and server jobs ---------------------------------------------------

    def edit_values(self, data: st.DataObject) -> dict[str, object]:
        changes = data.draw(field_changes(self.NAME, nested=False))
        return {
            key: None if value is DELETE else value
            for key, value in changes.items()
            if key in self.model.fields
        }

    @precondition(lambda self: self.state is not None)
    @rule(data=st.data(), roles=st.sets(st.sampled_from(["supervisor", "approver"])))
    def back_office_edits(self, data: st.DataObject, roles: set[str]) -> None:
        context = ctx(Origin.BACKOFFICE, roles=["backoffice", *roles], user="bo1")
        self.server_edit(self.edit_values(data), context)

    @precondition(lambda self: self.state is not None)
    @rule(data=st.data())
    def server_job_edits(self, data: st.DataObject) -> None:
        self.server_edit(self.edit_values(data), SERVER)

    # -- the end ---------------------------------------------------------------------

    def teardown(self) -> None:
        """Everyone online, everything exchanged: every device equals the server."""
        for device in self.devices:
            device.online = True
            self.merge(device.doc.get_update(self.server.get_state()), device.ctx, device)
        for device in self.devices:
            device.doc.apply_update(self.server.get_update(device.doc.get_state()))
            device.inbox.clear()
        final = comparable(record.read_state(self.server, self.model))
        for device in self.devices:
            assert comparable(record.read_state(device.doc, self.model)) == final
        if self.state is not None:
            assert violations(self.NAME, self.state, SERVER) == []


class ActivitySync(RecordSync):
    NAME = "activity"
    TYPICAL: ClassVar[dict[str, object]] = {
        "jobdesc": "inspect pump",
        "jobstatus": "ASSIGNED",
        "plandatetime": at(-120),
        "expirydatetime": at(240),
    }
    FOCUS: ClassVar[dict[str, list[object]]] = {
        "jobstatus": ["ASSIGNED", "INPROGRESS", "STANDBY", "PARTIALLYCOMPLETED", "COMPLETED"],
        "endtime": [at(-90), at(-20)],
    }

    @precondition(lambda self: self.state is not None)
    @rule()
    def server_autocloses(self) -> None:
        self.server_edit({"jobstatus": "AUTOCLOSED"}, SERVER)


class WorkOrderSync(RecordSync):
    NAME = "work-orders"
    TYPICAL: ClassVar[dict[str, object]] = {
        "description": "replace valve",
        "workstatus": "ASSIGNED",
        "workpermit": "PARTIALLY_APPROVED",
    }
    FOCUS: ClassVar[dict[str, list[object]]] = {
        "workstatus": ["ASSIGNED", "INPROGRESS", "INPROGRESS", "COMPLETED", "CANCELLED"],
        "workpermit": ["PARTIALLY_APPROVED", "APPROVED", "REJECTED", "NOT_REQUIRED"],
    }


class AttendanceSync(RecordSync):
    NAME = "attendance"
    TYPICAL: ClassVar[dict[str, object]] = {
        "people": "p1",
        "datefor": "2024-05-01",
        "punchintime": at(-60),
        "lat_in": INSIDE[0],
        "lon_in": INSIDE[1],
        "accuracy": 10,
    }
    FOCUS: ClassVar[dict[str, list[object]]] = {
        "punchintime": [at(-50), at(-40)],
        "remarks": ["device says", "other"],
        "lat_in": [INSIDE[0], OUTSIDE[0]],
        "verified": [True],
    }


class HelpdeskSync(RecordSync):
    NAME = "helpdesk"
    TYPICAL: ClassVar[dict[str, object]] = {
        "ticketdesc": "printer jam",
        "status": "NEW",
        "priority": "MEDIUM",
        "level": 1,
        "isescalated": True,
    }
    FOCUS: ClassVar[dict[str, list[object]]] = {
        "level": [0, 1, 2, 3],
        "status": ["OPEN", "RESOLVED"],
        "isescalated": [True, False],
    }


def case(machine: type[RecordSync]) -> Any:
    test_case = machine.TestCase
    test_case.settings = STATEFUL
    return test_case


TestActivitySync = case(ActivitySync)
TestWorkOrderSync = case(WorkOrderSync)
TestAttendanceSync = case(AttendanceSync)
TestHelpdeskSync = case(HelpdeskSync)
