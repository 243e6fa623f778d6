"""Shared fixtures: a fake upstream and a gateway in front of it, both on loopback.

Tests marked `soak` are long and opt-in: they are deselected (not collected into the run, so
never a silent skip) unless SLUICE_SOAK=1, and with it they run like any other test. Tests
marked `llama` (a real llama-cpp-python server, tests/real_servers) likewise need
SLUICE_LLAMA=1; `tools/llama-tests.sh` sets it up and runs them.
Tests marked `agents` (real coding agents, installed with npm) likewise need SLUICE_AGENTS=1.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from gateway.testing.fake_upstream import FakeUpstream

_OPT_IN = {"soak": "SLUICE_SOAK", "llama": "SLUICE_LLAMA", "agents": "SLUICE_AGENTS"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect each opt-in marker's tests unless its variable is 1 (never a silent skip)."""
    for marker, variable in _OPT_IN.items():
        if os.environ.get(variable) == "1":
            continue
        opted = [item for item in items if item.get_closest_marker(marker) is not None]
        if opted:
            items[:] = [item for item in items if item.get_closest_marker(marker) is None]
            config.hook.pytest_deselected(items=opted)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream on a free port."""
    async with FakeUpstream() as upstream:
        yield upstream
