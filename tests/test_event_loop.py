"""`fieldsync serve` runs on uvloop where it is installed, on asyncio's loop if asked."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from server.event_loop import loop_class, loop_name
from tests.helpers import ServerProcess

NO_GUARD = ("--head-timeout", "0", "--max-pending-connections", "0")


def test_auto_is_uvloop_when_installed() -> None:
    assert loop_class("auto") is uvloop.Loop and loop_class("uvloop") is uvloop.Loop
    assert loop_class("asyncio") is asyncio.SelectorEventLoop
    assert loop_name(uvloop.Loop) == "uvloop"
    assert loop_name(asyncio.SelectorEventLoop) == "asyncio"
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        loop_class("trio")


@pytest.mark.parametrize(
    ("args", "expected"),
    [((), "uvloop"), (("--event-loop", "asyncio"), "asyncio"), (NO_GUARD, "uvloop")],
)
async def test_serve_says_which_loop_it_runs_on(
    tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    log = tmp_path / "serve.log"
    server = ServerProcess(tmp_path / "x.db", *args, log=log)
    server.start()
    try:
        await server.ready()
    finally:
        server.stop()
    assert f"event loop: {expected}" in log.read_text()
