"""The short fault suite in ``make test``: the faults of ``scenarios.SHORT`` with 8 conversations.
``make faults`` runs every fault with 30 conversations and prints the full table."""

from __future__ import annotations

import pytest

from tests.faults.run import RunOptions, run_scenario, table
from tests.faults.scenarios import BY_NAME, SHORT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.mark.parametrize("name", SHORT)
async def test_fault_exactly_once(name, tmp_path):
    result = await run_scenario(BY_NAME[name], RunOptions(conversations=8, turns=2), tmp_path)
    print("\n" + table([result]))
    assert result.settled, "turns still queued or playing at the end"
    assert result.verdict.whole_turns >= 8, "too few turns checked byte for byte"
    assert (result.verdict.lost, result.verdict.duplicated, result.verdict.reordered) == (0, 0, 0)
    assert result.verdict.corrupt == 0 and result.verdict.bad_turns == 0, result.verdict.problems
    assert result.ok
