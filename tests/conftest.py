"""Shared fixtures: a fake upstream and a gateway in front of it, both on loopback.

Tests marked `soak` are long and opt-in: they are skipped unless SLUICE_SOAK=1, and with
it they run like any other test (they never skip themselves).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from gateway.testing.fake_upstream import FakeUpstream


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `soak` tests unless SLUICE_SOAK=1."""
    if os.environ.get("SLUICE_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: opt in with SLUICE_SOAK=1")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream on a free port."""
    async with FakeUpstream() as upstream:
        yield upstream
