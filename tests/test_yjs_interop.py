"""Interop: the real npm `yjs` + `y-websocket` client against /api/v1/yjs on a real server.

`tests/interop/sync_record.mjs` runs stock WebsocketProviders in Node (versions pinned in
`tests/interop/package-lock.json`). Install them first with

    npm ci --prefix tests/interop

Without `node` on PATH these tests skip, except under CI (env CI set), where they fail.
Missing or stale `node_modules` always fails, with the command to run: the test never
installs anything itself (no hidden network access, no races between parallel runs).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.yprotocol import AWARENESS, SYNC, Reader, message
from tests.helpers import Api, Client, Replica, token

INTEROP = Path(__file__).resolve().parent / "interop"
SCRIPT = INTEROP / "sync_record.mjs"
INSTALL = "npm ci --prefix tests/interop"
RUN_TIMEOUT_S = 45  # the script bounds each wait by its own --timeout-ms (10 s)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not on PATH, and CI is set: the yjs interop tests must run")
        pytest.skip("node is not on PATH (Node >= 18 runs the yjs interop tests)")
    pinned = json.loads((INTEROP / "package.json").read_text())["dependencies"]
    for name, version in pinned.items():
        installed = INTEROP / "node_modules" / name / "package.json"
        if not installed.is_file():
            pytest.fail(f"{installed.parent} is missing: run `{INSTALL}` before pytest")
        found = json.loads(installed.read_text())["version"]
        if found != version:
            pytest.fail(f"{name} {found} is installed but {version} is pinned: run `{INSTALL}`")
    return node


def _args(client: Client, record_id: str, **options: str) -> list[str]:
    url = f"ws://{client.server.host}:{client.server.port}/api/v1/yjs"
    out = [str(SCRIPT), "--url", url, "--record", record_id, "--bu", "bu1"]
    for name, value in options.items():
        out += [f"--{name.replace('_', '-')}", value]
    return out


async def _start(node: str, args: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        node,
        *args,
        cwd=INTEROP,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _finish(proc: asyncio.subprocess.Process) -> tuple[list[dict[str, Any]], str]:
    """Wait for the script (bounded), insist on exit 0; returns its JSON lines and stderr."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        pytest.fail(f"node did not finish in {RUN_TIMEOUT_S} s\n{out.decode()}\n{err.decode()}")
    stderr = err.decode()
    assert proc.returncode == 0, f"node exited {proc.returncode}\n{out.decode()}\n{stderr}"
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()], stderr


async def _record(client: Client, record_id: str) -> dict[str, Any]:
    resp = await client.get(
        f"/api/v1/records/activity/{record_id}", headers=Api(client, token()).headers()
    )
    assert resp.status == 200, await resp.text()
    record: dict[str, Any] = await resp.json()
    return record


async def test_two_node_providers_sync_a_record_through_the_server(client: Client) -> None:
    node = _node()
    r = str(uuid.uuid4())
    proc = await _start(
        node,
        _args(client, r, token_a=token(user="node-a"), token_b=token(user="node-b")),
    )
    [result], stderr = await _finish(proc)

    want = {"jobdesc": "from node A", "remarks": "from node B", "gracetime": 15}
    assert result["a"] == want and result["b"] == want, result
    # a saw its own type error, then the server's repair (the script checks that the repair
    # came after the bad write on both docs, authored by a third client)
    assert result["gracetime_seen"]["a"] == [15, "fifteen", 15], result
    assert result["gracetime_seen"]["b"][-1] == 15, result
    for side in ("a", "b"):
        frames = result["stats"][side]
        # one connection each, never dropped, and no resending after the server's echoes
        # (the script also checks that nothing is sent during 500 ms of quiet)
        assert frames["connections"] == 1 and frames["closes"] == [], result
        assert frames["sent"] < 20, result
    assert "closed by server" not in stderr, stderr
    assert (await _record(client, r))["fields"] == want


async def test_an_http_push_reaches_an_open_node_provider_live(client: Client) -> None:
    node = _node()
    r = str(uuid.uuid4())
    phone = Replica()
    api = Api(client, token(user="tech"), device="phone")
    await api.push(
        "activity", [{"record_id": r, "bu": "bu1", "update": phone.set(jobdesc="from the phone")}]
    )
    proc = await _start(node, _args(client, r, token_a=token(user="node-w"), watch="priority=HIGH"))
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), RUN_TIMEOUT_S)
    except TimeoutError:
        line = b""
    if not line:  # exited or stuck before it synced: _finish says why
        await _finish(proc)
        pytest.fail("node printed nothing before it synced")
    synced = json.loads(line)
    # a late provider gets the record's state in the handshake
    assert synced == {"event": "synced", "fields": {"jobdesc": "from the phone"}}, synced
    await api.push("activity", [{"record_id": r, "update": phone.set(priority="HIGH")}])
    [seen], _ = await _finish(proc)
    assert seen["event"] == "seen"
    assert seen["fields"] == {"jobdesc": "from the phone", "priority": "HIGH"}, seen
    assert seen["stats"]["watch"]["connections"] == 1, seen


async def test_a_peer_hears_its_own_awareness_back(client: Client) -> None:
    """y-websocket drops a socket that received nothing for 30 s and reconnects. A lone
    provider only ever hears its own 15 s awareness renewals, echoed by the server (the
    reference server sends every awareness update to all connections, sender included)."""
    r = str(uuid.uuid4())
    ws = await client.ws_connect(f"/api/v1/yjs/activity/{r}?token={token()}&bu=bu1")
    state = json.dumps({"user": {"name": "alone"}}).encode()
    await ws.send_bytes(message(AWARENESS, message(1, 7, 1, state)))
    async with asyncio.timeout(5):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            reader = Reader(msg.data)
            kind = reader.var_uint()
            if kind == AWARENESS and state in reader.var_bytes():
                break
            assert kind in (SYNC, AWARENESS), kind
    await ws.close()
