"""Fixtures for the loopback integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.integration._helm import find_helm, kubernetes_validate_command
from tests.integration._support import GatedUpstream, RawUpstream


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client session (no timeouts of its own: tests bound their waits)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


@pytest.fixture
async def gated() -> AsyncIterator[GatedUpstream]:
    """A fake upstream whose GatedScripts can hold any chunk until the test releases it."""
    upstream = GatedUpstream()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    """An upstream that writes exact bytes (RawScripts), broken HTTP framing included."""
    upstream = await RawUpstream().start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture(scope="session")
def helm() -> str:
    """A helm binary: on PATH, in .tools/bin, or installed there by tools/fetch-helm.sh."""
    return find_helm()


@pytest.fixture(scope="session")
def kubernetes_validate() -> list[str]:
    """The command that runs kubernetes-validate."""
    return kubernetes_validate_command()
