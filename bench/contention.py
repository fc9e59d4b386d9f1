"""Contention across nodes: many devices edit a few records through every node at once.

What it measures
----------------
``--nodes`` ``fieldsync serve`` processes (default 2) on one database (``--db pg``: a
throwaway PostgreSQL with fsync on; ``--db postgresql://…``; ``--db sqlite``). ``--devices``
devices (default 24) each keep a replica of ``--records`` activity records (default 4),
created through the first node, then for ``--duration`` seconds (at most ``--max-pushes``
per device) each edits a random record and pushes the edit to a random node, one request
at a time: the worst case for nodes that merge one record at the same moment.

It reports pushes answered 200 and 503 (a merge that lost the race to another node
``MERGE_ATTEMPTS`` times running is answered 503, never acknowledged), push latency,
and merges redone (``fieldsync_merge_retries``, summed over the nodes).

``python bench/contention.py`` (add ``--quick`` for a 5 s run); JSON in
``bench/results/contention.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    RESULTS_DIR,
    Databases,
    mint,
    parse_db,
    percentiles,
    running_nodes,
    write_json,
)
from pycrdt import Doc, Map

HEADERS: dict[str, str] = {}


class Replica:
    def __init__(self) -> None:
        self.doc: Doc[Any] = Doc()
        self.fields = self.doc.get("fields", type=Map)

    def edit(self, **values: Any) -> bytes:
        before = self.doc.get_state()
        with self.doc.transaction():
            for name, value in values.items():
                self.fields[name] = value
        update: bytes = self.doc.get_update(before)
        return update


async def push(
    http: aiohttp.ClientSession, url: str, device: str, item: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    body = {"items": [{**item, "update": base64.b64encode(item["update"]).decode()}]}
    async with http.post(
        f"{url}/api/v1/sync/activity/sync", json=body, headers={**HEADERS, "Device-Id": device}
    ) as resp:
        return resp.status, await resp.json()


async def device_loop(
    http: aiohttp.ClientSession,
    urls: tuple[str, ...],
    index: int,
    creates: dict[str, bytes],
    until: float,
    max_pushes: int,
    out: dict[str, Any],
) -> None:
    rng = random.Random(index)
    replicas = {}
    for record_id, create in creates.items():
        replicas[record_id] = Replica()
        replicas[record_id].doc.apply_update(create)
    for n in range(max_pushes):
        if time.monotonic() >= until:
            break
        record_id = rng.choice(list(replicas))
        remark = f"dev-{index} edit {n}"
        update = replicas[record_id].edit(remarks=remark)
        started = time.monotonic()
        status, _ = await push(
            http, rng.choice(urls), f"dev-{index}", {"record_id": record_id, "update": update}
        )
        out["latency"].append(time.monotonic() - started)
        out["status"][status] = out["status"].get(status, 0) + 1


async def merges_redone(http: aiohttp.ClientSession, urls: tuple[str, ...]) -> int:
    total = 0
    for url in urls:
        async with http.get(f"{url}/metrics") as resp:
            found = re.search(r"^fieldsync_merge_retries ([0-9.e+]+)$", await resp.text(), re.M)
        total += int(float(found.group(1))) if found else 0
    return total


async def run(urls: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"latency": [], "status": {}}
    async with aiohttp.ClientSession() as http:
        creates = {}
        for _ in range(args.records):
            record_id = str(uuid.uuid4())
            creates[record_id] = Replica().edit(jobdesc="shared task", jobstatus="ASSIGNED")
            status, body = await push(
                http,
                urls[0],
                "creator",
                {"record_id": record_id, "bu": "bu1", "update": creates[record_id]},
            )
            assert status == 200, body
        until = time.monotonic() + args.duration
        await asyncio.gather(
            *(
                device_loop(http, urls, i, creates, until, args.max_pushes, out)
                for i in range(args.devices)
            )
        )
        out["merges_redone"] = await merges_redone(http, urls)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", type=parse_db, default="pg")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--devices", type=int, default=24)
    p.add_argument("--records", type=int, default=4)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-pushes", type=int, default=5000, help="per device")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "contention.json")
    args = p.parse_args()
    if args.quick:
        args.duration = 5.0
    HEADERS["Authorization"] = f"Bearer {mint('bench')}"
    databases = Databases(args.db)
    try:
        with running_nodes(databases, args.nodes) as nodes:
            result = asyncio.run(run(nodes.urls, args))
    finally:
        databases.close()
    latency = result.pop("latency")
    p50, p99 = percentiles(latency) if latency else (0.0, 0.0)
    pushes = len(latency)
    summary = {
        "db": args.db,
        "nodes": args.nodes,
        "devices": args.devices,
        "records": args.records,
        "seconds": args.duration,
        "pushes": pushes,
        "pushes_per_s": pushes / args.duration,
        "status": {str(k): v for k, v in sorted(result["status"].items())},
        "merges_redone": result["merges_redone"],
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
    }
    print(
        f"{args.nodes} nodes on {databases.kind}, {args.devices} devices x {args.records} records,"
        f" {args.duration:.0f} s"
    )
    status = result["status"]
    columns = ("pushes", "per s", "200", "503", "redone", "p50 ms", "p99 ms")
    values = (
        f"{pushes}",
        f"{pushes / args.duration:.0f}",
        f"{status.get(200, 0)}",
        f"{status.get(503, 0)}",
        f"{result['merges_redone']}",
        f"{p50 * 1000:.1f}",
        f"{p99 * 1000:.1f}",
    )
    print(" ".join(f"{c:>8}" for c in columns))
    print(" ".join(f"{v:>8}" for v in values))
    write_json(args.out, summary)
    failed = set(status) - {200}
    return 1 if failed - {503} else 0


if __name__ == "__main__":
    raise SystemExit(main())
