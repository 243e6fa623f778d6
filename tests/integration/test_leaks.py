"""Requests leave nothing alive once they end, whichever way they end.

A probe plugin puts a marker object into every request's context and keeps only a weak
reference to it; after the gateway shut down and a full collection, every marker must be
gone, i.e. nothing still holds any request's context. (The soak test checks the same on
a real `sluice serve` under load; these cases are the ones it found leaking.)
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any, ClassVar

import aiohttp
import pytest

from gateway.context import RequestContext, StateKey
from gateway.plugin import Plugin
from gateway.testing.fake_upstream import FakeUpstream, Script, openai_stream
from gateway.testing.harness import run_gateway
from tests.integration._support import BOUND, CHAT, chat_body, config_for, final_error, json_error


class _Marker:
    """Something weakly referenceable to hang on a context."""


_MARK: StateKey[_Marker] = StateKey("leak_probe.marker")


class MarkerProbe(Plugin):
    """Marks each request's context; `refs` holds weak references to the markers."""

    name = "leak_probe"
    refs: ClassVar[list[weakref.ref[_Marker]]] = []

    async def on_request(self, ctx: RequestContext) -> None:
        marker = _Marker()
        ctx.set(_MARK, marker)
        self.refs.append(weakref.ref(marker))


def _alive() -> int:
    gc.collect()
    return sum(ref() is not None for ref in MarkerProbe.refs)


async def _requests(config: dict[str, Any], count: int) -> list[tuple[int, bytes]]:
    answers = []
    async with (
        run_gateway(config, registry={"leak_probe": MarkerProbe}) as gw,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(count):
            async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=chat_body()) as resp:
                answers.append((resp.status, await resp.read()))
    return answers


@pytest.mark.parametrize(
    ("script", "timeouts", "code"),
    [
        pytest.param(
            Script(openai_stream(["a", "b"], done=False), then="hang"),
            {"idle": 0.05},
            "upstream_idle_timeout",
            id="idle-timeout",
        ),
        pytest.param(
            Script([], then="hang"), {"first_byte": 0.05}, "upstream_first_byte_timeout", id="ttfb"
        ),
    ],
)
async def test_a_stream_cut_by_a_timeout_leaves_nothing_alive(
    fake: FakeUpstream, script: Script, timeouts: dict[str, float], code: str
) -> None:
    """The watchdog closes the upstream response while a read is pending; aiohttp then
    raises one shared exception instance, whose traceback must not keep the request."""
    MarkerProbe.refs = []
    fake.default = script
    config = config_for(fake, plugins=[{"name": "leak_probe"}], timeouts=timeouts)
    answers = await _requests(config, 3)
    for status, raw in answers:
        error = final_error(raw) if status == 200 else json_error(raw)
        assert error["code"] == code
    assert len(MarkerProbe.refs) == 3
    assert _alive() == 0, "a timed-out request is still referenced"


async def test_ended_streams_leave_nothing_alive(fake: FakeUpstream) -> None:
    """The control: completed, truncated and reset streams."""
    MarkerProbe.refs = []
    fake.queue(
        Script(openai_stream(["ok"])),
        Script(openai_stream(["cut"], done=False)),
        Script(openai_stream(["reset"], done=False), then="reset"),
    )
    answers = await _requests(config_for(fake, plugins=[{"name": "leak_probe"}]), 3)
    assert [status for status, _ in answers] == [200, 200, 200]
    assert _alive() == 0
