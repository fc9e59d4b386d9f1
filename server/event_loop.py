"""The event loop `fieldsync serve` runs on: uvloop where it is installed, else asyncio's.

Every request passes through the loop several times (its socket, each slice of its merge,
each hop to a database thread and back); on uvloop (libuv) that machinery costs less:
measured in bench/, a 429 about 10% less CPU and the HTTP sync bench 7-30% more updates
per second.
uvloop does not build on Windows: there, and with `--event-loop asyncio`, asyncio's
selector loop serves, with the same behaviour.
"""

from __future__ import annotations

import asyncio
import importlib.util

CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_class(choice: str) -> type[asyncio.AbstractEventLoop]:
    """The loop class for `--event-loop` (`auto`: uvloop if installed)."""
    if choice not in CHOICES:
        raise ValueError(f"unknown event loop {choice!r}; one of {', '.join(CHOICES)}")
    if choice == "asyncio" or (choice == "auto" and not uvloop_installed()):
        return asyncio.SelectorEventLoop
    try:
        import uvloop
    except ImportError:
        raise ValueError("--event-loop uvloop: uvloop is not installed") from None
    return uvloop.Loop


def loop_name(cls: type[asyncio.AbstractEventLoop]) -> str:
    return "uvloop" if cls.__module__.split(".")[0] == "uvloop" else "asyncio"
