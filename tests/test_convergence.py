"""Property: many devices, random offline edits, random delivery order with duplicates —
every replica converges to the server's state, and the server's state breaks no rule.

Runs against one real server process over HTTP; each example uses a fresh record.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from crdt_models import activity, constraints
from crdt_models import record as records
from crdt_models.registry import get_model
from tests.helpers import Replica, ServerProcess, b64, token

FIELD_VALUES = {
    "jobdesc": st.text(max_size=12),
    "remarks": st.text(max_size=12),
    "priority": st.sampled_from(["LOW", "MEDIUM", "HIGH", "URGENT!"]),
    "gracetime": st.one_of(st.integers(-5, 120), st.just("15m")),
    "lat": st.floats(-90, 90, allow_nan=False),
    "jobstatus": st.sampled_from(["ASSIGNED", "INPROGRESS", "COMPLETED", "AUTOCLOSED", "DONE"]),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(Path(tmp_path_factory.mktemp("convergence")) / "c.db")
    proc.start()
    asyncio.run(proc.ready())
    yield proc
    proc.stop()


@dataclass
class Device:
    name: str
    replica: Replica = field(default_factory=Replica)
    sent: int = 0
    statuses: list[str] = field(default_factory=list)


step = st.one_of(
    st.tuples(st.just("edit"), st.integers(0, 3), st.sampled_from(sorted(FIELD_VALUES))),
    st.tuples(st.just("sync"), st.integers(0, 3), st.just("")),
)


class Session:
    """One record's sync traffic; with several nodes, each push goes to a node drawn at random."""

    def __init__(
        self, http: aiohttp.ClientSession, urls: list[str], record_id: str, data: st.DataObject
    ) -> None:
        self.http, self.urls, self.record_id, self.data = http, urls, record_id, data

    @property
    def url(self) -> str:
        if len(self.urls) == 1:
            return self.urls[0]
        return self.data.draw(st.sampled_from(self.urls), label="node")

    async def push(self, device: Device, updates: list[bytes], with_sv: bool) -> None:
        items: list[dict[str, Any]] = [
            {"record_id": self.record_id, "bu": "bu1", "update": b64(u)} for u in updates
        ]
        if with_sv:
            items.append(
                {
                    "record_id": self.record_id,
                    "bu": "bu1",
                    "state_vector": b64(device.replica.doc.get_state()),
                }
            )
        headers = {"Authorization": f"Bearer {token()}", "Device-Id": device.name}
        async with self.http.post(
            f"{self.url}/api/v1/sync/activity/sync", json={"items": items}, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            results = (await resp.json())["results"]
        for result in results:
            assert result["status"] != "error", result
            event(f"status {result['status']}" + (" with decisions" if result["decisions"] else ""))
            if result["update"]:
                device.replica.apply(base64.b64decode(result["update"]))

    async def server_state(self, url: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token()}", "Device-Id": "auditor"}
        async with self.http.get(
            f"{url}/api/v1/records/activity/{self.record_id}", headers=headers
        ) as resp:
            return dict((await resp.json())["fields"])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n_devices=st.integers(2, 4),
    steps=st.lists(step, min_size=1, max_size=25),
    data=st.data(),
)
def test_replicas_converge_and_rules_hold(
    server: ServerProcess, n_devices: int, steps: list[tuple[str, int, str]], data: st.DataObject
) -> None:
    asyncio.run(scenario([server.url], n_devices, steps, data))


async def scenario(
    urls: list[str], n_devices: int, steps: list[tuple[str, int, str]], data: st.DataObject
) -> None:
    """Devices edit offline and sync in random order; all converge and the rules hold.

    With several nodes, every node must end with the same record as every device.
    """
    devices = [Device(f"dev-{uuid.uuid4().hex[:8]}") for _ in range(n_devices)]
    async with aiohttp.ClientSession() as http:
        session = Session(http, urls, str(uuid.uuid4()), data)
        creator = devices[0]
        await session.push(creator, [creator.replica.set(jobdesc="created")], with_sv=False)
        creator.sent = 1
        for kind, index, name in steps:
            device = devices[index % n_devices]
            if kind == "edit":
                value = data.draw(FIELD_VALUES[name])
                device.replica.set(**{name: value})
                if name == "jobstatus":
                    device.statuses.append(cast(str, value))
            else:
                await _deliver_some(session, device, data)
        # everyone comes online, in any order: unsent updates, then catch-up by state vector
        for device in data.draw(st.permutations(devices), label="online order"):
            await session.push(device, device.replica.outbox[device.sent :], with_sv=True)
            device.sent = len(device.replica.outbox)
        for device in devices:
            await session.push(device, [], with_sv=True)
        server_fields = await session.server_state(urls[0])
        for url in urls[1:]:
            assert await session.server_state(url) == server_fields
    for device in devices:
        assert _normalized(device.replica.state()) == server_fields
    _assert_rules_hold(server_fields)
    _assert_no_status_went_back(server_fields, devices)


async def _deliver_some(session: Session, device: Device, data: st.DataObject) -> None:
    """Send the device's unsent updates shuffled, some twice, maybe holding the last ones back."""
    unsent = device.replica.outbox[device.sent :]
    if not unsent:
        return
    count = data.draw(st.integers(1, len(unsent)))
    chosen = unsent[:count]
    order = data.draw(
        st.permutations(chosen + data.draw(st.lists(st.sampled_from(chosen), max_size=2)))
    )
    await session.push(device, list(order), with_sv=data.draw(st.booleans()))
    device.sent += count


def _normalized(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: records.json_value(v) for k, v in fields.items()}


def _assert_no_status_went_back(fields: dict[str, Any], devices: list[Device]) -> None:
    """However edits raced, the task ends at least as far along as any phone moved it."""
    flow = activity.FLOW
    written = [
        status
        for device in devices
        for status in device.statuses
        if status in flow.ranks and status != activity.AUTOCLOSED
    ]
    if written:
        final = fields.get("jobstatus")
        assert final in flow.ranks, fields
        assert flow.ranks[cast(str, final)] >= max(flow.ranks[s] for s in written), (final, written)


def _assert_rules_hold(fields: dict[str, Any]) -> None:
    model = get_model("activity")
    state = records.RecordState(fields)
    ctx = constraints.Context(
        "auditor", frozenset(), None, constraints.Origin.SERVER, datetime.now(UTC)
    )
    assert constraints.evaluate(model, None, state, ctx) == []
