"""Slice budgets by tenant: a tenant under its share of recent merge time gets long
slices, a heavy one and a lone one short ones; and the pipeline charges real merge time."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from server.services import SERVICES
from server.slices import SliceBudgets
from tests.helpers import Api, Client, Replica

SHORT, LONG = 0.001, 0.004


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _budgets(clock: Clock) -> SliceBudgets:
    return SliceBudgets(SHORT, LONG, half_life_s=2.0, clock=clock)


def test_a_tenant_merging_alone_gets_short_slices() -> None:
    budgets = _budgets(Clock())
    assert budgets.budget("a") == SHORT
    budgets.charge("a", 0.5)
    assert budgets.budget("a") == SHORT


def test_the_lighter_tenant_gets_long_slices_the_heavier_short_ones() -> None:
    budgets = _budgets(Clock())
    budgets.charge("heavy", 0.9)
    budgets.charge("light", 0.1)
    assert budgets.budget("light") == LONG
    assert budgets.budget("heavy") == SHORT


def test_a_newcomer_next_to_a_busy_tenant_gets_long_slices() -> None:
    budgets = _budgets(Clock())
    budgets.charge("busy", 0.2)
    assert budgets.budget("new") == LONG


def test_usage_fades_so_a_tenant_that_stopped_is_no_one_s_neighbour() -> None:
    clock = Clock()
    budgets = _budgets(clock)
    budgets.charge("was-heavy", 5.0)
    budgets.charge("other", 0.1)
    assert budgets.budget("other") == LONG
    clock.now += 2.0 * SliceBudgets.ACTIVE_HALF_LIVES  # the heavy tenant went quiet
    budgets.charge("other", 0.1)
    assert budgets.budget("other") == SHORT  # alone again
    clock.now += 1.0
    budgets.charge("was-heavy", 0.01)  # back, lightly: its old usage has decayed
    assert budgets.budget("was-heavy") == LONG


def test_equal_tenants_both_get_short_slices() -> None:
    budgets = _budgets(Clock())
    budgets.charge("a", 0.3)
    budgets.charge("b", 0.3)
    assert budgets.budget("a") == SHORT
    assert budgets.budget("b") == SHORT


async def test_a_push_charges_its_merge_time_to_its_tenant(
    client: Client, api: Callable[..., Api]
) -> None:
    assert client.app is not None
    pipeline = client.app[SERVICES].pipeline
    clock = Clock()
    pipeline.slices = _budgets(clock)
    pipeline.slices.charge("t2", 1e-6)  # another tenant merged a little
    items = [
        {"record_id": str(uuid.uuid4()), "bu": "bu1", "update": Replica().set(jobdesc=f"{i}")}
        for i in range(3)
    ]
    results = await api("t1").push("activity", items)
    assert [r["status"] for r in results] == ["created"] * 3
    assert pipeline.slices.budget("t1") == SHORT  # t1 merged more than t2 since
    assert pipeline.slices.budget("t2") == LONG


def test_a_forgotten_tenant_s_usage_leaves_the_share() -> None:
    clock = Clock()
    budgets = _budgets(clock)
    budgets.charge("gone", 1000.0)  # enough to dominate the sum for a long time
    clock.now += 2.0 * SliceBudgets.ACTIVE_HALF_LIVES
    budgets.charge("a", 0.02)
    budgets.charge("b", 0.01)
    # the share is (a + b) / 2 = 0.015, not inflated by what is left of "gone"'s 1000 s
    assert budgets.budget("b") == LONG
    assert budgets.budget("a") == SHORT
