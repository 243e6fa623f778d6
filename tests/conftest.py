"""Shared fixtures: a fake upstream and a gateway in front of it, both on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.testing.fake_upstream import FakeUpstream


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream on a free port."""
    async with FakeUpstream() as upstream:
        yield upstream
