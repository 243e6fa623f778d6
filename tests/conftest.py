"""Shared fixtures: a fake upstream and a gateway in front of it, both on loopback.

Tests marked `soak` are long and opt-in: they are deselected (not collected into the run, so
never a silent skip) unless SLUICE_SOAK=1, and with it they run like any other test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from gateway.testing.fake_upstream import FakeUpstream


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect `soak` tests unless SLUICE_SOAK=1."""
    if os.environ.get("SLUICE_SOAK") == "1":
        return
    soak = [item for item in items if item.get_closest_marker("soak") is not None]
    if soak:
        items[:] = [item for item in items if item.get_closest_marker("soak") is None]
        config.hook.pytest_deselected(items=soak)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream on a free port."""
    async with FakeUpstream() as upstream:
        yield upstream
