"""Long fuzz run of every parser of untrusted bytes (tests/test_fuzz.py runs a bounded one).

For each target it feeds mutated valid inputs and random bytes for a time budget. An
input that raises anything but the target's documented error is a finding: it is saved
to tests/corpus/fuzz/<target>/ (replayed by every test run from then on) and reported.

    python bench/fuzz.py [--seconds 60] [--targets update_gate,push_body] [--max-inputs N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fuzz_targets import CORPUS, TARGETS, mutate, seeds  # noqa: E402


def run_target(name: str, seconds: float, max_inputs: int, rng: random.Random) -> dict[str, object]:
    target, pool = TARGETS[name], seeds()[name]
    deadline = time.monotonic() + seconds
    tried, findings = 0, []
    while tried < max_inputs and time.monotonic() < deadline:
        if rng.random() < 0.8:
            payload = mutate(rng.choice(pool), rng, rounds=rng.choice((1, 3, 8)))
        else:
            payload = os.urandom(rng.randint(0, 256))
        tried += 1
        try:
            target(payload)
        except Exception as exc:  # noqa: BLE001 - anything undocumented is what we look for
            findings.append(save(name, payload, exc))
    return {
        "target": name,
        "inputs": tried,
        "findings": findings,
        "inputs_per_s": round(tried / max(seconds, 1e-9)),
    }


def save(name: str, payload: bytes, exc: Exception) -> str:
    path = CORPUS / name / f"finding-{hashlib.sha256(payload).hexdigest()[:16]}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    print(f"FINDING in {name}: {type(exc).__name__}: {exc} -> {path}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget per target")
    parser.add_argument("--max-inputs", type=int, default=5_000_000, help="input budget per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz.json"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # contained pycrdt failures are expected here, by the million
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    rows = [run_target(t, args.seconds, args.max_inputs, rng) for t in args.targets.split(",")]
    print(f"fuzz run, seed {seed}, {args.seconds:g} s per target")
    print(f"{'target':<14} {'inputs':>10} {'inputs/s':>9} {'findings':>9}")
    for row in rows:
        print(
            f"{row['target']:<14} {row['inputs']:>10} {row['inputs_per_s']:>9} "
            f"{len(row['findings']):>9}"
        )  # type: ignore[arg-type]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"seed": seed, "seconds": args.seconds, "targets": rows}, indent=2)
    )
    return 1 if any(row["findings"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
