"""Bounded fuzzing of every parser of untrusted bytes (the long run is bench/fuzz.py)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_targets import TARGETS, corpus, mutate, seeds

SEEDS = seeds()


@pytest.mark.parametrize(("target", "path"), corpus(), ids=lambda v: getattr(v, "name", v))
def test_the_corpus_replays_cleanly(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_and_random_inputs_raise_only_documented_errors(
    target: str, data: st.DataObject
) -> None:
    if data.draw(st.booleans()):
        seed = data.draw(st.sampled_from(SEEDS[target]))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        payload = mutate(seed, rng)
    else:
        payload = data.draw(st.binary(max_size=512))
    TARGETS[target](payload)
