"""The broker behaviours the stack relies on, checked on the broker the tests use.

The checks are defined once, in ``infra/conformance.py`` (``python -m infra.conformance``
prints them as a table for any broker). A relied-on check that fails here fails the
test, except the gaps ``KNOWN_GAPS`` records for the local broker kind: those are
expected to fail (strictly where the failure is deterministic), so a broker upgrade
that fixes one is noticed. ``docs/brokers.md`` has the table for every local broker.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra import broker as local_broker
from infra.conformance import BY_KEY, CHECKS, KNOWN_GAPS, Check, Target, local_target, run_check

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RELIED_ON = [c for c in CHECKS if c.relied_on and not c.needs_restart]
# A snapshot can land between the last acknowledgement and the kill, and a write may
# miss the window in which a stopping broker still acknowledges: not always lost.
NOT_STRICT = {"durability", "graceful_stop"}


def _external() -> bool:
    return bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))


def _expect_gap(request: pytest.FixtureRequest, key: str) -> None:
    if _external():
        return
    gap = KNOWN_GAPS.get(local_broker.kind_setting(), {}).get(key)
    if gap is not None:
        request.applymarker(pytest.mark.xfail(reason=gap, strict=key not in NOT_STRICT))


@pytest.mark.parametrize("check", RELIED_ON, ids=lambda c: c.key)
def test_relied_on_behaviour(check: Check, bootstrap: str, request: pytest.FixtureRequest) -> None:
    _expect_gap(request, check.key)
    outcome = run_check(check, Target(bootstrap))
    assert outcome.status == "pass", f"{check.title}: {outcome.note}"


@pytest.mark.parametrize("key", ["durability", "graceful_stop"])
def test_acknowledged_writes_survive_a_broker_restart(
    key: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On a broker of the local kind of its own: the check SIGKILLs it (durability) or
    stops and starts it (graceful_stop)."""
    if _external():
        pytest.skip("the tests use an external broker, which this test cannot restart")
    _expect_gap(request, key)
    check = BY_KEY[key]
    with local_target(local_broker.kind_setting(), tmp_path / "broker") as target:
        outcome = run_check(check, target)
    assert outcome.status == "pass", f"{check.title}: {outcome.note}"
