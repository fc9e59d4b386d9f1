"""An independent probe of how long the disk takes to flush, for benches a slow disk disturbs.

On a shared VM one fsync now and then takes 0.1-0.9 s (seen on the 2-core bench machine:
a group commit of 924 ms with 20 quiet requests behind it, in a phase where nothing else
ran). A bench cannot tell that from the server's own slowness by looking at the server,
so a process of its own writes and fsyncs one 4 KiB block next to the database every
`EVERY_S` and logs every flush of `LOG_MS` or more, with when it started. The times are
`time.perf_counter()`: CLOCK_MONOTONIC on Linux, the same clock in every process.

Run as a script by `DiskProbe`; it stops when its parent goes away or after `MAX_S`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

EVERY_S = 0.02
LOG_MS = 10.0  # flushes this slow are logged (an idle flush here takes about 0.4 ms)
STALL_MS = 50.0  # a disk stall: the server's own commits under load take 2-25 ms
MAX_S = 4 * 3600.0
BLOCK = b"\0" * 4096


def overlap_ms(start: float, ms: float, other_start: float, other_ms: float) -> float:
    """How long [start, start + ms) and [other_start, other_start + other_ms) overlap."""
    end, other_end = start + ms / 1000, other_start + other_ms / 1000
    return max(0.0, min(end, other_end) - max(start, other_start)) * 1000


@dataclass(frozen=True, slots=True)
class Flush:
    start: float  # perf_counter
    ms: float

    @property
    def stall(self) -> bool:
        return self.ms >= STALL_MS


@dataclass(frozen=True, slots=True)
class DiskStats:
    """The probe's flushes in one phase."""

    slow: int  # of LOG_MS or more
    stalls: int  # of STALL_MS or more
    max_ms: float


def disk_stats(flushes: Sequence[Flush]) -> DiskStats:
    return DiskStats(
        slow=len(flushes),
        stalls=sum(f.stall for f in flushes),
        max_ms=max((f.ms for f in flushes), default=0.0),
    )


def during_stall(start: float, ms: float, flushes: Sequence[Flush]) -> bool:
    return any(f.stall and overlap_ms(start, ms, f.start, f.ms) > 0 for f in flushes)


class DiskProbe:
    """`with DiskProbe(folder) as probe:` flushes a file in `folder` while the block runs."""

    def __init__(self, folder: Path) -> None:
        self.log = folder / "disk_probe.log"
        self._target = folder / "disk_probe.dat"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DiskProbe:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, str(self._target), str(self.log)],
            stdin=subprocess.DEVNULL,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)

    def flushes(self, start: float, end: float) -> list[Flush]:
        """The logged flushes that overlapped [start, end]."""
        if not self.log.exists():
            return []
        found = []
        for line in self.log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                flush = Flush(float(parts[0]), float(parts[1]))
                if overlap_ms(start, (end - start) * 1000, flush.start, flush.ms) > 0:
                    found.append(flush)
        return found


def probe(target: Path, log: Path) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    parent = os.getppid()
    deadline = time.monotonic() + MAX_S
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with log.open("a", buffering=1) as out:
            while os.getppid() == parent and time.monotonic() < deadline:
                os.pwrite(fd, BLOCK, 0)
                start = time.perf_counter()
                os.fsync(fd)
                ms = (time.perf_counter() - start) * 1000
                if ms >= LOG_MS:
                    out.write(f"{start:.6f} {ms:.3f}\n")
                time.sleep(EVERY_S)
    finally:
        os.close(fd)
        target.unlink(missing_ok=True)


if __name__ == "__main__":
    probe(Path(sys.argv[1]), Path(sys.argv[2]))
